"""Text in, translations out: one output line per input line, in input order.

Input is read in chunks (so stdin streams and memory stays flat on a long input); inside a chunk sentences
are sorted by length and cut into token-budget batches for speed, then written back in their original order.
A chunk of one line answers each line as soon as it is read (a terminal, or a program that writes a line and
waits). An empty input line gives an empty output line without running the model. Output files are written
atomically; stdout is written and flushed chunk by chunk.

Also here: several checkpoints decoding as an ensemble, target prefixes, word alignments from the
cross-attention, and the n-best formats.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass, field
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
from mt.decoder_only import DecoderOnlyTransformer
from mt.model import Transformer, attention_maps
from mt.fast import bf16_cpu_linears, int8_linears
from mt.runtime import decode_batch_tokens, native_bf16, resolve_precision
from mt.search import Ensemble, SearchOutput, beam_search, greedy_search, length_penalty, sample

log = logging.getLogger(__name__)

CHUNK_LINES = 10_000
NBEST_FORMATS = ("plain", "moses", "json")


@dataclass
class Translator:
    model: Transformer | Ensemble  # what the search runs
    vocab: Vocab
    decode: DecodeConfig
    device: torch.device
    members: list[Transformer] = field(default_factory=list)  # the models, for alignments (model's own if empty)

    def __post_init__(self):
        if not self.members and isinstance(self.model, (Transformer, DecoderOnlyTransformer)):
            self.members = [self.model]


@dataclass
class Hypothesis:
    """One translation of one sentence."""

    text: str
    score: float  # what the search ranked by (length-normalised for beam search)
    log_prob: float  # log P(translation + EOS | source)
    tokens: list[int]  # target ids, without EOS
    alignment: str | None = None  # Pharaoh "i-j" pairs of source and target word indices, when asked
    attention: dict | None = None  # source and target pieces and their cross-attention, when asked


def load_translator(checkpoint: str | Path | list, overrides: Iterable[str] = (), search_overrides: Iterable[str] = (),
                    device: str | None = None) -> Translator:
    """Rebuild the model from `checkpoint` alone; `overrides` (`decode.beam_size=5`) adjust the search.
    Several checkpoints decode as an ensemble (`Ensemble`), with the first one's search settings; they must
    share one vocabulary."""
    paths = list(checkpoint) if isinstance(checkpoint, (list, tuple)) else [checkpoint]
    first = _load_one(paths[0], overrides, search_overrides, device)
    if len(paths) == 1:
        return first
    members = [first.model]
    for path in paths[1:]:
        other = _load_one(path, overrides, search_overrides, device)
        if other.vocab.identity != first.vocab.identity:
            raise MTError(f"{path}: its vocabulary differs from {paths[0]}'s; an ensemble needs one vocabulary")
        members.append(other.model)
    return Translator(Ensemble(members), first.vocab, first.decode, first.device, members)


def _load_one(checkpoint: str | Path, overrides: Iterable[str], search_overrides: Iterable[str],
              device: str | None) -> Translator:
    dev = search_device(device)  # before the checkpoint is read: a mistyped --device fails fast
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
    model = model.to(dev, dtype)
    if precision == "bf16" and dev.type == "cpu":
        model = bf16_cpu_linears(model)
    return Translator(model, vocab, cfg.decode, dev)


def search_device(name: str | None) -> torch.device:
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


def search(model: Transformer | Ensemble, src: torch.Tensor, decode: DecodeConfig,
           prefix: torch.Tensor | None = None) -> SearchOutput:
    """src (batch, src_len), prefix (batch, prefix_len) or None -> the configured search's output."""
    common = dict(bos=BOS, eos=EOS, pad=PAD, max_len_a=decode.max_len_a, max_len_b=decode.max_len_b, prefix=prefix)
    if decode.method == "greedy":
        return greedy_search(model, src, **common)
    if decode.method == "sample":
        return sample(model, src, temperature=decode.temperature, top_k=decode.top_k, top_p=decode.top_p, **common)
    return beam_search(model, src, beam_size=decode.beam_size, alpha=decode.length_penalty, nbest=decode.nbest,
                       early_stop=decode.early_stop, **common)


def translate_nbest(translator: Translator, lines: list[str], prefixes: list[str] | None = None,
                    alignment: bool = False, on_batch: Callable[[int], object] | None = None
                    ) -> list[list[Hypothesis]]:
    """Translate `lines`; for each, its n-best list, best first. prefixes: one target prefix per line ("" for
    none) that each translation starts with. alignment: also each hypothesis's word alignment and
    cross-attention (`align`). An empty line gives one empty hypothesis without running the model.
    `on_batch` is told each batch's number of sentences once they are translated (for progress)."""
    results = [[Hypothesis("", 0.0, 0.0, [], "" if alignment else None)] for _ in lines]
    todo = [i for i, line in enumerate(lines) if line.strip()]
    if not todo:
        return results
    vocab, decode = translator.vocab, translator.decode
    ids = vocab.src.encode([lines[i] for i in todo])
    forced = vocab.tgt.encode([prefixes[i] for i in todo]) if prefixes is not None else None
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lens.sum()))
    offsets = np.concatenate([[0], np.cumsum(lens)])
    max_tokens = decode_batch_tokens(decode.max_tokens, translator.device)
    for batch in make_batches(lens, np.zeros_like(lens), max_tokens, 0, 0, shuffle=False):
        src = torch.from_numpy(pad_sentences(flat, offsets, batch, prefix=None, suffix=EOS)).to(translator.device)
        prefix = _pad([forced[j] for j in batch.tolist()]).to(translator.device) if forced is not None else None
        out = search(translator.model, src, decode, prefix)
        tokens, scores, lengths = out.tokens.tolist(), out.scores.tolist(), out.lengths.tolist()
        # Beam search ranks by log P / lp(|Y|); the others by log P itself.
        lp = length_penalty(out.lengths, decode.length_penalty if decode.method == "beam" else 0.0).tolist()
        for row, j in enumerate(batch.tolist()):
            hyps = []
            for hyp, score, length, penalty in zip(tokens[row], scores[row], lengths[row], lp[row]):
                body = [x for x in hyp[:length] if x not in (PAD, EOS)]
                hyps.append(Hypothesis(vocab.tgt.decode(body), score, score * penalty, body))
            results[todo[j]] = hyps
        if on_batch is not None:
            on_batch(len(batch))
    if alignment:
        for i in todo:
            align(translator, vocab.src.encode(lines[i]), results[i])
    return results


def _pad(rows: list[list[int]]) -> torch.Tensor:
    """Token lists -> (len(rows), longest) long, padded with PAD."""
    out = torch.full((len(rows), max(map(len, rows), default=0)), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def translate_lines(translator: Translator, lines: list[str]) -> list[str]:
    return [nbest[0].text for nbest in translate_nbest(translator, lines)]


# ---- word alignments from the cross-attention


def why_no_alignments(translator: Translator) -> str | None:
    """Why `align` cannot serve this translator, in one line; None when it can."""
    if not translator.members:
        return "alignments need mt's own model (not an exported one)"
    if any(m.cfg.arch == "decoder_only" for m in translator.members):
        return "alignments come from cross-attention, which a decoder_only model has not"
    return None


def align(translator: Translator, src_ids: list[int], hyps: list[Hypothesis]) -> None:
    """Fill each hypothesis's `alignment` and `attention` from one teacher-forced pass per model over the
    source (ids without EOS) and the hypotheses.

    The attention is the last decoder layer's cross-attention averaged over heads (fairseq's default) and
    over the ensemble's models; row t is the attention while predicting target piece t. A target word is
    aligned to the source word its pieces attend to most (a word's first piece starts with U+2581)."""
    if (reason := why_no_alignments(translator)) is not None:
        raise MTError(reason)
    if not hyps:
        return
    device = translator.device
    src = torch.tensor([src_ids + [EOS]] * len(hyps), device=device)
    tgt_in = _pad([[BOS] + h.tokens for h in hyps]).to(device)  # (n, 1 + longest)
    probs = 0
    for model in translator.members:
        cross = attention_maps(model, src, tgt_in).cross
        probs = probs + cross[-1].mean(1)  # (n, T, S)
    probs = (probs / len(translator.members)).cpu()
    src_pieces = translator.vocab.src.id_to_piece(src_ids) + ["</s>"]
    src_words = _word_index(src_pieces[:-1])
    for h, p in zip(hyps, probs):
        tgt_pieces = translator.vocab.tgt.id_to_piece(h.tokens) + ["</s>"]
        matrix = p[:len(tgt_pieces), :]  # rows: target pieces and EOS; columns: source pieces and EOS
        h.attention = {"source": src_pieces, "target": tgt_pieces,
                       "weights": [[round(w, 4) for w in row] for row in matrix.tolist()]}
        h.alignment = _pharaoh(matrix[:-1, :-1], src_words, _word_index(tgt_pieces[:-1]))


def _word_index(pieces: list[str]) -> list[int]:
    """The word each SentencePiece piece belongs to: a piece starting with U+2581 starts a word."""
    index, word = [], -1
    for piece in pieces:
        if piece.startswith("\u2581") or word < 0:
            word += 1
        index.append(word)
    return index


def _pharaoh(piece_attention: torch.Tensor, src_words: list[int], tgt_words: list[int]) -> str:
    """piece_attention (target pieces, source pieces) -> "i-j ..." (source word i, target word j), each target
    word linked to the source word that its pieces, on average, attend to most."""
    if not src_words or not tgt_words:
        return ""
    by_src = torch.zeros(piece_attention.size(0), src_words[-1] + 1).index_add_(
        1, torch.tensor(src_words), piece_attention)  # (target pieces, source words)
    by_word = torch.zeros(tgt_words[-1] + 1, by_src.size(1)).index_add_(0, torch.tensor(tgt_words), by_src)
    return " ".join(f"{i}-{j}" for j, i in enumerate(by_word.argmax(1).tolist()))


def write_lines(path: str | Path, lines: Iterable[str]) -> None:
    with atomic_open(path, "w") as f:
        for line in lines:
            f.write(line + "\n")


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(lines)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def format_hypotheses(number: int, source: str, hyps: list[Hypothesis], nbest: int | None, fmt: str,
                      alignment: bool) -> Iterator[str]:
    """The output lines of input line `number` (0-based). Without nbest: the best translation (and
    " ||| alignment"). With nbest (or fmt moses or json): plain 'number ||| text ||| score', Moses's
    'number ||| text ||| logprob= L length= N ||| score', or one JSON object per input line."""
    hyps = hyps[:nbest or 1]
    if fmt == "json":
        yield json.dumps({"id": number, "source": source, "translations": [
            {"text": h.text, "score": round(h.score, 6), "log_prob": round(h.log_prob, 6),
             "length": len(h.tokens) + 1, **({"alignment": h.alignment} if alignment else {})} for h in hyps]},
            ensure_ascii=False)
        return
    tail = (lambda h: f" ||| {h.alignment}") if alignment else (lambda h: "")
    for h in hyps:
        if fmt == "moses":
            yield f"{number} ||| {h.text} ||| logprob= {h.log_prob:.4f} length= {len(h.tokens) + 1} ||| {h.score:.4f}{tail(h)}"
        elif nbest:
            yield f"{number} ||| {h.text} ||| {h.score:.4f}{tail(h)}"
        else:
            yield h.text + tail(h)


def translate_stream(translator: Translator, input: str = "-", output: str = "-", nbest: int | None = None,
                     nbest_format: str = "plain", alignment: bool = False, prefix: str | None = None,
                     buffer_lines: int | None = None) -> int:
    """Translate `input` (a path or '-' for stdin) into `output` (a path or '-'); returns the line count.
    prefix: a file of one target prefix per input line. buffer_lines: lines read before translating (default
    1 when stdin is a terminal, else CHUNK_LINES)."""
    if buffer_lines is None:
        buffer_lines = 1 if input == "-" and sys.stdin.isatty() else CHUNK_LINES
    if buffer_lines < 1:
        raise MTError(f"--buffer-lines must be at least 1, got {buffer_lines}")
    if alignment and (reason := why_no_alignments(translator)) is not None:
        raise MTError(f"--alignment: {reason}")  # before a line is translated, not after the first chunk
    lines = read_lines(input)
    pairs = _with_prefixes(lines, input, prefix) if prefix else ((line, None) for line in lines)
    count = 0
    # Progress: a bar on a terminal, else a log line per chunk; a file's length is known, so both give an ETA.
    total = None if str(input) == "-" else _count_lines(input)
    bar = tqdm(total=total, desc="translate", unit="line", dynamic_ncols=True, mininterval=1.0,
               disable=True if buffer_lines == 1 or not log.isEnabledFor(logging.INFO) else None)
    started = time.perf_counter()

    def blocks() -> Iterator[list[str]]:
        """The output lines of each chunk of input lines."""
        nonlocal count
        for chunk in _chunks(pairs, buffer_lines):
            sources = [line for line, _ in chunk]
            prefixes = [p for _, p in chunk] if prefix else None
            block = []
            translated = translate_nbest(translator, sources, prefixes, alignment, on_batch=bar.update)
            bar.update(sum(1 for line in sources if not line.strip()))  # empty lines: not searched
            for k, hyps in enumerate(translated):
                block.extend(format_hypotheses(count + k, sources[k], hyps, nbest, nbest_format, alignment))
            count += len(chunk)
            if bar.disable and buffer_lines > 1:
                rate = count / max(time.perf_counter() - started, 1e-9)
                eta = f", ETA {tqdm.format_interval((total - count) / rate)}" if total else ""
                log.info("translated %d%s lines, %.1f lines/s%s", count, f" of {total}" if total else "", rate, eta)
            yield block
        bar.close()

    if output == "-":
        for block in blocks():
            sys.stdout.write("".join(line + "\n" for line in block))
            sys.stdout.flush()  # a caller waiting for this chunk's lines gets them now
    else:
        write_lines(output, itertools.chain.from_iterable(blocks()))
    return count


def _with_prefixes(lines: Iterable[str], input: str, prefix: str) -> Iterator[tuple[str, str]]:
    """Pair each input line with its prefix line; the two files must have as many lines."""
    prefixes = read_lines(prefix)
    for number, (line, p) in enumerate(itertools.zip_longest(lines, prefixes), start=1):
        if line is None or p is None:
            shorter = input if line is None else prefix
            raise MTError(f"{prefix}: {'more' if line is None else 'fewer'} prefix lines than {input} has "
                          f"lines ({shorter} ends at line {number - 1})")
        yield line, p


def _count_lines(path: str | Path) -> int:
    """Lines in a plain or .gz text file, a last line without its newline included."""
    with open_text(path) as f:
        return sum(1 for _ in f)
