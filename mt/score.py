"""`mt score`: the log-probability a model gives each target sentence for its source, for filtering a corpus
and reranking.

A score is log P(target + EOS | source) from one teacher-forced pass (the training path, in fp32), normalised
over the whole vocabulary as in training and search, so it equals minus the unsmoothed training loss of the
pair and the score greedy or beam search gives the same output. Pairs are read in chunks and batched by
length; the output keeps their order.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mt.checkpoint import load_for_inference
from mt.data import BOS, EOS, PAD, Vocab, make_batches, pad_sentences
from mt.errors import MTError
from mt.io import atomic_open, read_lines
from mt.model import Transformer
from mt.runtime import decode_batch_tokens
from mt.translate import search_device

CHUNK_PAIRS = 10_000


@dataclass
class Scorer:
    model: Transformer
    vocab: Vocab
    device: torch.device
    max_tokens: int  # padded tokens per side of a batch


def load_scorer(checkpoint: str | Path, device: str | None = None, max_tokens: int | None = None) -> Scorer:
    dev = search_device(device)
    model, vocab, cfg = load_for_inference(checkpoint)
    tokens = decode_batch_tokens(max_tokens if max_tokens is not None else cfg.decode.max_tokens, dev)
    if tokens < 1:
        raise MTError(f"--max-tokens must be at least 1, got {tokens}")
    return Scorer(model.to(dev), vocab, dev, tokens)


def _flat(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token lists -> (lengths, flat tokens, offsets), the layout `pad_sentences` reads."""
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lens.sum()))
    return lens, flat, np.concatenate([[0], np.cumsum(lens)])


@torch.inference_mode()
def score_pairs(scorer: Scorer, sources: list[str], targets: list[str]) -> list[tuple[float, int]]:
    """Each pair's (log P(target + EOS | source), target tokens with EOS), in order."""
    src_lens, src_flat, src_offsets = _flat(scorer.vocab.src.encode(sources))
    tgt_lens, tgt_flat, tgt_offsets = _flat(scorer.vocab.tgt.encode(targets))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sources)
    for batch in make_batches(src_lens, tgt_lens, scorer.max_tokens, 0, 0, shuffle=False):
        def side(flat, offsets, prefix, suffix):
            return torch.from_numpy(pad_sentences(flat, offsets, batch, prefix, suffix)).to(scorer.device)

        src = side(src_flat, src_offsets, None, EOS)
        tgt_in, tgt_out = side(tgt_flat, tgt_offsets, BOS, None), side(tgt_flat, tgt_offsets, None, EOS)
        lprobs = F.log_softmax(scorer.model(src, tgt_in).float(), dim=-1)  # (B, T, V)
        token_lp = lprobs.gather(2, tgt_out.unsqueeze(2)).squeeze(2).masked_fill(tgt_out.eq(PAD), 0.0)
        totals, counts = token_lp.sum(1).tolist(), tgt_out.ne(PAD).sum(1).tolist()
        for j, total, count in zip(batch.tolist(), totals, counts):
            out[j] = (total, count)
    return out


def _pairs(src_path: str, tgt_path: str) -> Iterator[tuple[str, str]]:
    for number, (s, t) in enumerate(itertools.zip_longest(read_lines(src_path), read_lines(tgt_path)), start=1):
        if s is None or t is None:
            longer, shorter = (tgt_path, src_path) if s is None else (src_path, tgt_path)
            raise MTError(f"{longer}: has more lines than {shorter} ({number - 1}); score needs one target per source")
        yield s, t


def score_file(scorer: Scorer, src_path: str, tgt_path: str, output: str = "-") -> int:
    """Write 'total<TAB>per_token' for each pair of the two files; returns the pair count. A file's extra lines
    are an error before anything is written to a file output (stdout has the lines before them)."""
    def lines() -> Iterator[str]:
        pairs = _pairs(src_path, tgt_path)
        while chunk := list(itertools.islice(pairs, CHUNK_PAIRS)):
            for total, count in score_pairs(scorer, [s for s, _ in chunk], [t for _, t in chunk]):
                yield f"{total:.4f}\t{total / count:.4f}"

    count = 0
    if output == "-":
        for line in lines():
            sys.stdout.write(line + "\n")
            count += 1
        sys.stdout.flush()
    else:
        with atomic_open(output, "w") as f:
            for line in lines():
                f.write(line + "\n")
                count += 1
    return count
