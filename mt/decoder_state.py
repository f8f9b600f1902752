"""The incremental decoder's state (fairseq-style): what `Transformer.decode_step` carries from one target
position to the next.

Per decoder layer, a self-attention cache of the keys and values of the positions decoded so far (grown by
doubling), and the cross-attention keys and values of the encoder's output, computed once per sentence and
shared by its beams. Shapes: rows B (sentences, or sentences x beams), sentences N, heads H, head width Dh,
source length S.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


def append_to_cache(cache: tuple[Tensor, Tensor], k: Tensor, v: Tensor,
                    position: int) -> tuple[tuple[Tensor, Tensor], Tensor, Tensor]:
    """Write `position`'s keys and values into a layer's self-attention cache.

    cache: keys and values, each (B, H, capacity, Dh), filled for positions < position; k, v (B, H, 1, Dh).
    Returns the cache (the same tensors, or new ones of doubled capacity when it was full) and the keys and
    values of positions 0..position, each (B, H, position + 1, Dh), views into it. Doubling makes appends amortised
    O(1) copies instead of a torch.cat of the whole history at every step.
    """
    cache_k, cache_v = cache
    if position >= cache_k.size(2):
        capacity = max(2 * cache_k.size(2), position + 1)
        cache_k, cache_v = _resize(cache_k, position, capacity), _resize(cache_v, position, capacity)
    cache_k[:, :, position:position + 1] = k
    cache_v[:, :, position:position + 1] = v
    return (cache_k, cache_v), cache_k[:, :, :position + 1], cache_v[:, :, :position + 1]


def _resize(buffer: Tensor, filled: int, capacity: int, index: Tensor | None = None) -> Tensor:
    """A new (B', H, capacity, Dh) buffer holding the first `filled` positions of buffer (B, H, _, Dh), rows
    picked by `index` (B',) when given. Positions from `filled` on are left uninitialised: never read."""
    rows = buffer.size(0) if index is None else index.size(0)
    out = buffer.new_empty(rows, buffer.size(1), capacity, buffer.size(3))
    head = buffer[:, :, :filled]
    out[:, :, :filled] = head if index is None else head.index_select(0, index)
    return out


@dataclass
class DecoderState:
    """Everything the incremental decoder carries between steps for B rows: sentences, or sentences x beams.

    Rows come in groups of `group` consecutive rows that decode the same sentence (the beams of beam search;
    1 otherwise) and share one row of the memory and its cross-attention keys and values, so those hold
    N = B / group rows. `decode_step` writes into the self-attention caches in place and advances `step`;
    `select` builds a new state. Only the first `step` positions of a self-attention cache are meaningful.
    """

    memory: Tensor  # (N, S, D): the encoder's output
    src_pad: Tensor  # (N, S) bool, True at padding
    cross_kv: list[tuple[Tensor, Tensor]]  # per decoder layer: keys, values, each (N, H, S, Dh)
    self_kv: list[tuple[Tensor, Tensor]]  # per decoder layer: keys, values, each (B, H, capacity, Dh)
    step: int = 0  # tokens fed so far
    group: int = 1  # rows per sentence

    @property
    def capacity(self) -> int:
        """Positions the self-attention caches hold before they next grow."""
        return self.self_kv[0][0].size(2) if self.self_kv else 0

    def select(self, index: Tensor, sentences: Tensor | None = None) -> "DecoderState":
        """A new state whose row i is this state's row index[i]: index (B',) long, on the state's device.

        Greedy search prunes finished sentences with it (group 1: the memory follows `index`). Beam search
        (group > 1) reorders beams within their sentences and prunes whole sentences: `index` must then keep
        each new group's rows inside one old group, and `sentences` (B' / group,) names the old group
        (memory row) of each new group; None keeps every sentence where it is, and the memory is not copied.
        Copies the filled part of each self-attention cache only; the capacity is kept.
        """
        if sentences is None and self.group == 1:
            sentences = index
        if sentences is None:
            memory, src_pad, cross_kv = self.memory, self.src_pad, self.cross_kv
        else:
            memory, src_pad = self.memory.index_select(0, sentences), self.src_pad.index_select(0, sentences)
            cross_kv = [(k.index_select(0, sentences), v.index_select(0, sentences)) for k, v in self.cross_kv]
        return DecoderState(
            memory=memory, src_pad=src_pad, cross_kv=cross_kv,
            self_kv=[(_resize(k, self.step, k.size(2), index), _resize(v, self.step, v.size(2), index))
                     for k, v in self.self_kv],
            step=self.step, group=self.group,
        )
