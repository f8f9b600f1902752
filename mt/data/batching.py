"""Token-based batching (Section 5.1: "Sentence pairs were batched together by approximate sequence length").

A batch holds as many pairs as fit a budget of *padded* tokens on each side: pairs are sorted by target then
source length (ties broken at random), cut greedily into batches, and the batches shuffled. The order is a
pure function of (seed, epoch), so a run resumed mid-epoch recomputes it and skips the batches it has
already seen: the position saved in a checkpoint is just (epoch, batches done).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mt.data.cache import EncodedCorpus
from mt.data.vocab import BOS, EOS, PAD


@dataclass
class Batch:
    src: torch.Tensor  # (batch, src_len) long: ids + EOS, padded with PAD
    tgt_in: torch.Tensor  # (batch, tgt_len) long: BOS + ids, padded
    tgt_out: torch.Tensor  # (batch, tgt_len) long: ids + EOS, padded
    indices: np.ndarray  # (batch,) positions of the pairs in the corpus

    @property
    def n_tgt_tokens(self) -> int:
        return int(self.indices.size and (self.tgt_out != PAD).sum())

    def to(self, device: torch.device) -> "Batch":
        if device.type != "cuda":
            return Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device), self.indices)

        # From pinned memory a host-to-device copy is asynchronous; from pageable memory it can make the host
        # wait for the device, a synchronisation per training step.
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True)

        return Batch(move(self.src), move(self.tgt_in), move(self.tgt_out), self.indices)


def make_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int, seed: int, epoch: int,
                 shuffle: bool = True) -> list[np.ndarray]:
    """Cut pairs into batches of at most `max_tokens` padded tokens per side.

    src_lens, tgt_lens: (n,) subword lengths without special tokens (each side gets one added: EOS on the
    source, BOS or EOS on the target). Returns index arrays; a pair longer than the budget gets a batch of
    its own rather than being dropped. With `shuffle=False` (dev and test sets) the order is by length and
    does not depend on the seed.
    """
    src_width = np.asarray(src_lens, np.int64) + 1  # with the special token
    tgt_width = np.asarray(tgt_lens, np.int64) + 1
    rng = np.random.default_rng([seed, epoch])
    tie = rng.permutation(len(src_width)) if shuffle else np.arange(len(src_width))
    order = np.lexsort((tie, src_width, tgt_width))  # the last key is the primary one
    batches, start, max_s, max_t = [], 0, 0, 0
    s_sorted, t_sorted = src_width[order].tolist(), tgt_width[order].tolist()
    for i, (ls, lt) in enumerate(zip(s_sorted, t_sorted)):
        n = i - start + 1
        new_s, new_t = max(max_s, ls), max(max_t, lt)
        if n > 1 and (new_s * n > max_tokens or new_t * n > max_tokens):
            batches.append(order[start:i])
            start, new_s, new_t = i, ls, lt
        max_s, max_t = new_s, new_t
    if start < len(order):
        batches.append(order[start:])
    if shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[j] for j in perm]
    return batches


def collate(corpus: EncodedCorpus, indices: np.ndarray) -> Batch:
    """Gather pairs into padded tensors without a Python loop over the batch."""
    src = pad_sentences(corpus.src_tokens, corpus.src_offsets, indices, prefix=None, suffix=EOS)
    tgt_in = pad_sentences(corpus.tgt_tokens, corpus.tgt_offsets, indices, prefix=BOS, suffix=None)
    tgt_out = pad_sentences(corpus.tgt_tokens, corpus.tgt_offsets, indices, prefix=None, suffix=EOS)
    return Batch(torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out), indices)


def pad_sentences(tokens: np.ndarray, offsets: np.ndarray, indices: np.ndarray, prefix: int | None,
         suffix: int | None) -> np.ndarray:
    """(batch, max_len + 1) int64: sentences `indices` of the flat `tokens` (sentence i is
    tokens[offsets[i]:offsets[i + 1]]), each with `prefix` or `suffix` added, padded with PAD."""
    starts = np.asarray(offsets[indices], np.int64)
    lens = np.asarray(offsets[indices + 1], np.int64) - starts
    width = int(lens.max(initial=0)) + 1
    col = np.arange(width)[None, :]
    shift = 1 if prefix is not None else 0
    pos = col - shift  # position inside the sentence's ids
    inside = (pos >= 0) & (pos < lens[:, None])
    gather = np.where(inside, starts[:, None] + pos, 0)
    out = np.where(inside, tokens[gather] if len(tokens) else 0, PAD).astype(np.int64)
    if prefix is not None:
        out[:, 0] = prefix
    if suffix is not None:
        out[np.arange(len(indices)), lens] = suffix
    return out


@dataclass
class BatchStats:
    batches: int
    pairs: int
    real_tokens: int  # source + target tokens, specials included
    padded_tokens: int

    @property
    def efficiency(self) -> float:
        return self.real_tokens / max(self.padded_tokens, 1)

    def __str__(self) -> str:
        return (f"{self.batches} batches, {self.pairs / max(self.batches, 1):.1f} pairs per batch, "
                f"real tokens {100 * self.efficiency:.1f}% of padded")


def batch_stats(batches: list[np.ndarray], src_lens: np.ndarray, tgt_lens: np.ndarray) -> BatchStats:
    real = padded = pairs = 0
    for batch in batches:
        src_width, tgt_width = src_lens[batch] + 1, tgt_lens[batch] + 1
        real += int(src_width.sum() + tgt_width.sum())
        padded += len(batch) * int(src_width.max() + tgt_width.max())
        pairs += len(batch)
    return BatchStats(len(batches), pairs, real, padded)


def iterate_batches(corpus: EncodedCorpus, max_tokens: int, seed: int, epoch: int, start: int = 0,
                    shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, Batch, int]]:
    """Yield (position, batch, group_tokens) for one epoch from batch `start` on.

    `shard=(rank, world)` gives each of `world` processes every world-th batch, after trimming the epoch to a
    multiple of `world` so every rank takes the same number of steps (the few trimmed batches come back
    in other epochs, whose shuffle differs). `group_tokens` counts the target tokens of the batches all
    ranks take at this position, computed locally from the shared batch order, so each rank can normalise
    its loss by the global token count without communicating.
    """
    batches = make_batches(corpus.src_lens, corpus.tgt_lens, max_tokens, seed, epoch)
    rank, world = shard
    usable = len(batches) - len(batches) % world
    tgt_lens = corpus.tgt_lens
    for position in range(start, usable // world):
        group = batches[position * world:(position + 1) * world]
        group_tokens = sum(int(tgt_lens[b].sum()) + len(b) for b in group)
        yield position, collate(corpus, group[rank]), group_tokens
