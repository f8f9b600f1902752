"""The incremental decoder's state (fairseq-style): what `Transformer.decode_step` carries from one target
position to the next.

Per decoder layer, a self-attention cache of the keys and values of the positions decoded so far (grown by
doubling), and the cross-attention keys and values of the encoder's output, computed once per sentence and shared
by its beams. The decoder-only model (mt.decoder_only) has no cross-attention: its caches start with the source
prefix's keys and values (`offset` positions), then the target's. Shapes: rows B (sentences, or sentences x
beams), sentences N, heads H, head width Dh, source length S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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


def _resize(buffer: Tensor, filled: int, capacity: int) -> Tensor:
    """A new (B, H, capacity, Dh) buffer holding the first `filled` positions of buffer (B, H, _, Dh).
    Positions from `filled` on are left uninitialised: never read."""
    out = buffer.new_empty(buffer.size(0), buffer.size(1), capacity, buffer.size(3))
    out[:, :, :filled] = buffer[:, :, :filled]
    return out


def _reorder(buffer: Tensor, filled: int, index: Tensor, spare: Tensor | None) -> Tensor:
    """The first `filled` positions of buffer (B, H, capacity, Dh), rows picked by index (B',), written into
    `spare` (a buffer of the same capacity with at least B' rows, not aliasing `buffer`) where it fits, else
    into a new buffer: (B', H, capacity, Dh). Reusing the spare saves beam search a fresh cache-sized
    allocation per layer and step, whose pages the kernel would fault in again each time."""
    rows = index.size(0)
    if spare is None or spare.size(0) < rows or spare.shape[1:] != buffer.shape[1:]:
        spare = buffer.new_empty(rows, *buffer.shape[1:])
    out = spare[:rows]
    torch.index_select(buffer[:, :, :filled], 0, index, out=out[:, :, :filled])
    return out


def moved_rows(index: Tensor, rows: int) -> Tensor | None:
    """For a select of index (B',) from a buffer of `rows` rows: the rows i with index[i] != i, (m,) long, when
    copying those alone (twice: out and back) is cheaper than copying all B' rows once, that is m <= B' / 2.
    None otherwise, when B' > rows, and off the CPU, where reading m on the host would stall the device."""
    if index.device.type != "cpu" or index.size(0) > rows:
        return None
    moved = index.ne(torch.arange(index.size(0))).nonzero().squeeze(1)
    return moved if 2 * moved.size(0) <= index.size(0) else None


def _take(x: Tensor, index: Tensor, moved: Tensor | None, filled: int | None = None) -> Tensor:
    """x (B, ...) with its rows picked by index (B',): (B', ...), a new tensor; with `moved` (from `moved_rows`)
    x itself, overwritten, with only those rows copied. `filled`: x is a self-attention cache (B, H, capacity,
    Dh) of which the first `filled` positions alone are copied (with `moved` only)."""
    if moved is None:
        return x.index_select(0, index)
    part = x if filled is None else x[:, :, :filled]
    part.index_copy_(0, moved, part.index_select(0, index[moved]))  # every source is read before any write
    return x[:index.size(0)]


@dataclass
class DecoderState:
    """Everything the incremental decoder carries between steps for B rows: sentences, or sentences x beams.

    Rows come in groups of `group` consecutive rows that decode the same sentence (the beams of beam search;
    1 otherwise) and share one row of the memory and its cross-attention keys and values, so those hold
    N = B / group rows. `decode_step` writes into the self-attention caches in place and advances `step`;
    `select` builds a new state. Only the first `step` positions of a self-attention cache are meaningful.
    """

    memory: Tensor  # (N, S, D): the encoder's output (decoder-only: the stack's, over the source prefix)
    src_pad: Tensor  # (N, S) bool, True at padding
    cross_kv: list[tuple[Tensor, Tensor]]  # per decoder layer: keys, values, each (N, H, S, Dh); decoder-only: none
    self_kv: list[tuple[Tensor, Tensor]]  # per decoder layer: keys, values, each (B, H, capacity, Dh)
    step: int = 0  # tokens fed so far
    group: int = 1  # rows per sentence
    # Positions at the start of each self-attention cache before the first token fed: the decoder-only model's
    # source prefix (mt.decoder_only); 0 for the encoder-decoder.
    offset: int = 0
    # Per layer, the buffers the next `select` may write into: the caches of an earlier state, not these.
    spare_kv: list[tuple[Tensor, Tensor]] | None = None

    @property
    def capacity(self) -> int:
        """Positions the self-attention caches hold before they next grow."""
        return self.self_kv[0][0].size(2) if self.self_kv else 0

    def select(self, index: Tensor, sentences: Tensor | None = None, group: int | None = None) -> "DecoderState":
        """A new state whose row i is this state's row index[i]: index (B',) long, on the state's device; its
        rows come in groups of `group` (default: this state's).

        Greedy search prunes finished sentences with it (group 1: the memory follows `index`). Beam search
        (group > 1) reorders beams within their sentences and prunes whole sentences: `index` must then keep
        each new group's rows inside one old group, and `sentences` (B' / group,) names the old group
        (memory row) of each new group; None keeps every sentence where it is, and the memory is not copied.
        Beam search starts from one row per sentence and widens to its beams after the first step (group
        1 -> K, sentences None: new group g's rows all come from old row g). Narrowing (group K -> 1) needs
        `sentences`. Copies the filled part (offset + step positions) of each self-attention cache only; the
        capacity is kept. Where at most half the rows move (`moved_rows`: on a CPU), those alone are copied
        inside this state's tensors; otherwise into the caches of the state this one was selected from. So a
        state is spent once selected from: only the new state is valid.
        """
        group = self.group if group is None else group
        if sentences is None and group == 1:
            sentences = index
        if sentences is None:
            memory, src_pad, cross_kv = self.memory, self.src_pad, self.cross_kv
        else:
            moved = moved_rows(sentences, self.memory.size(0))
            memory, src_pad = _take(self.memory, sentences, moved), _take(self.src_pad, sentences, moved)
            cross_kv = [(_take(k, sentences, moved), _take(v, sentences, moved)) for k, v in self.cross_kv]
        filled = self.offset + self.step
        moved = moved_rows(index, self.self_kv[0][0].size(0)) if self.self_kv else None
        if moved is not None:  # few rows change: copy those inside the caches
            self_kv = [(_take(k, index, moved, filled), _take(v, index, moved, filled)) for k, v in self.self_kv]
            spare_kv = self.spare_kv
        else:
            spares = self.spare_kv or [(None, None)] * len(self.self_kv)
            self_kv = [(_reorder(k, filled, index, spare_k), _reorder(v, filled, index, spare_v))
                       for (k, v), (spare_k, spare_v) in zip(self.self_kv, spares)]
            spare_kv = self.self_kv
        return DecoderState(memory=memory, src_pad=src_pad, cross_kv=cross_kv, self_kv=self_kv, step=self.step,
                            group=group, offset=self.offset, spare_kv=spare_kv)
