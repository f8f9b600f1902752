"""Text in, translations out: one output line per input line, in input order.

Input is read in chunks (so stdin streams and memory stays flat on a long input); inside a chunk sentences
are sorted by length and cut into token-budget batches for speed, then written back in their original order.
An empty input line gives an empty output line without running the model. Output files are written
atomically; stdout is written chunk by chunk.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from mt.checkpoint import load_for_inference
from mt.config import DecodeConfig, apply_override, from_dict, to_dict, validate, Config
from mt.data import BOS, EOS, PAD, Vocab, make_batches, pad_sentences
from mt.errors import MTError
from mt.io import atomic_open, open_text, read_lines
from mt.model import Transformer
from mt.fast import int8_linears
from mt.runtime import decode_batch_tokens, native_bf16, resolve_precision
from mt.search import SearchOutput, beam_search, greedy_search, sample

log = logging.getLogger(__name__)

CHUNK_LINES = 10_000


@dataclass
class Translator:
    model: Transformer
    vocab: Vocab
    decode: DecodeConfig
    device: torch.device


def load_translator(checkpoint: str | Path, overrides: Iterable[str] = (), search_overrides: Iterable[str] = (),
                    device: str | None = None) -> Translator:
    """Rebuild the model from `checkpoint` alone; `overrides` (`decode.beam_size=5`) adjust the search."""
    dev = _device(device)  # before the checkpoint is read: a mistyped --device fails fast
    model, vocab, cfg = load_for_inference(checkpoint)
    raw = to_dict(cfg)
    for item in [*overrides, *search_overrides]:
        apply_override(raw, item)
    cfg = from_dict(Config, raw, f"{checkpoint} (with overrides)")
    validate(cfg, f"{checkpoint} (with overrides)")
    # Search reads log-probs in float32 whatever the weights are (search.py calls .float() on the logits).
    precision = resolve_precision(cfg.decode.precision, dev)
    if precision == "bf16" and not native_bf16(dev):
        log.warning("bf16 search on this %s runs slower than fp32, not faster: it has no native bf16 matrix "
                    "products (AVX512-BF16 or AMX on a CPU), so they are emulated; use fp32 or auto", dev.type)
    if precision == "int8":
        if dev.type != "cpu":
            raise MTError(f"decode.precision int8 runs on a CPU only; on {dev} use bf16 or auto")
        return Translator(int8_linears(model), vocab, cfg.decode, dev)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return Translator(model.to(dev, dtype), vocab, cfg.decode, dev)


def _device(name: str | None) -> torch.device:
    """`--device`: cpu, cuda or cuda:N; None is cuda when available, else cpu."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MTError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MTError(f"--device {name}: no CUDA device is available")
    return device


def search(model: Transformer, src: torch.Tensor, decode: DecodeConfig) -> SearchOutput:
    """src (batch, src_len) -> the configured search's output."""
    common = dict(bos=BOS, eos=EOS, pad=PAD, max_len_a=decode.max_len_a, max_len_b=decode.max_len_b)
    if decode.method == "greedy":
        return greedy_search(model, src, **common)
    if decode.method == "sample":
        return sample(model, src, temperature=decode.temperature, top_k=decode.top_k, top_p=decode.top_p, **common)
    return beam_search(model, src, beam_size=decode.beam_size, alpha=decode.length_penalty, nbest=decode.nbest,
                       early_stop=decode.early_stop, **common)


def translate_nbest(translator: Translator, lines: list[str],
                    on_batch: Callable[[int], object] | None = None) -> list[list[tuple[str, float]]]:
    """Translate `lines`; for each, its n-best (text, score) list, best first (empty lines: [("", 0.0)]).
    `on_batch` is told each batch's number of sentences once they are translated (for progress)."""
    results: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in lines]
    todo = [i for i, line in enumerate(lines) if line.strip()]
    if not todo:
        return results
    ids = translator.vocab.src.encode([lines[i] for i in todo])
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lens.sum()))
    offsets = np.concatenate([[0], np.cumsum(lens)])
    max_tokens = decode_batch_tokens(translator.decode.max_tokens, translator.device)
    for batch in make_batches(lens, np.zeros_like(lens), max_tokens, 0, 0, shuffle=False):
        src = torch.from_numpy(pad_sentences(flat, offsets, batch, prefix=None, suffix=EOS))
        out = search(translator.model, src.to(translator.device), translator.decode)
        tokens, scores = out.tokens.tolist(), out.scores.tolist()
        for row, j in enumerate(batch.tolist()):
            results[todo[j]] = [
                (translator.vocab.tgt.decode([x for x in hyp if x not in (PAD, EOS)]), score)
                for hyp, score in zip(tokens[row], scores[row])
            ]
        if on_batch is not None:
            on_batch(len(batch))
    return results


def translate_lines(translator: Translator, lines: list[str]) -> list[str]:
    return [nbest[0][0] for nbest in translate_nbest(translator, lines)]


def write_lines(path: str | Path, lines: Iterable[str]) -> None:
    with atomic_open(path, "w") as f:
        for line in lines:
            f.write(line + "\n")


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(lines)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def translate_stream(translator: Translator, input: str = "-", output: str = "-", nbest: int | None = None) -> int:
    """Translate `input` (a path or '-' for stdin) into `output` (a path or '-'); returns the line count."""
    lines = read_lines(input)
    count = 0
    # Progress: a bar on a terminal, else a log line per chunk; a file's length is known, so both give an ETA.
    total = None if str(input) == "-" else _count_lines(input)
    bar = tqdm(total=total, desc="translate", unit="line", dynamic_ncols=True, mininterval=1.0,
               disable=None if log.isEnabledFor(logging.INFO) else True)
    started = time.perf_counter()

    def formatted() -> Iterator[str]:
        nonlocal count
        for chunk in _chunks(lines, CHUNK_LINES):
            translated = translate_nbest(translator, chunk, on_batch=bar.update)
            bar.update(sum(1 for line in chunk if not line.strip()))  # empty lines: not searched
            for k, hyps in enumerate(translated):
                if nbest:
                    for text, score in hyps[:nbest]:
                        yield f"{count + k} ||| {text} ||| {score:.4f}"
                else:
                    yield hyps[0][0]
            count += len(chunk)
            if bar.disable:
                rate = count / max(time.perf_counter() - started, 1e-9)
                eta = f", ETA {tqdm.format_interval((total - count) / rate)}" if total else ""
                log.info("translated %d%s lines, %.1f lines/s%s", count, f" of {total}" if total else "", rate, eta)
        bar.close()

    if output == "-":
        for line in formatted():
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    else:
        write_lines(output, formatted())
    return count


def _count_lines(path: str | Path) -> int:
    """Lines in a plain or .gz text file, a last line without its newline included."""
    with open_text(path) as f:
        return sum(1 for _ in f)
