"""The encoded corpus: SentencePiece ids stored once per run directory as flat memory-mapped arrays.

Layout of `run_dir/cache/<split>-<key>/`:

    src.bin, tgt.bin    every sentence's ids, concatenated (uint16 when the vocabulary fits, else int32)
    src.idx.npy, ...    int64 offsets, shape (n + 1,): sentence i is bin[idx[i]:idx[i + 1]]
    meta.json           counts, what each filter dropped, the dtype

The key hashes the corpus files' identity (path, size, modification time), the vocabulary's identity and
the filter settings, so a second run with the same inputs maps the arrays instead of re-tokenizing, and a
changed input gets a new cache. The corpus streams through in chunks, so memory stays flat whatever its size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from mt.config import DataConfig
from mt.data.corpus import Pair, corpus_files, read_corpus
from mt.data.vocab import Vocab
from mt.errors import MTError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CHUNK = 100_000  # pairs tokenized per SentencePiece call


@dataclass
class Filters:
    """Length filters in subword tokens, before BOS/EOS; `None` keeps every pair (dev and test sets)."""

    min_len: int = 1
    max_len: int = 250
    max_len_ratio: float = 9.0

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "Filters":
        return cls(cfg.min_len, cfg.max_len, cfg.max_len_ratio)


@dataclass
class EncodedCorpus:
    """A tokenized parallel corpus; arrays are memory-mapped, so opening one costs no RAM."""

    src_tokens: np.ndarray  # (total_src_tokens,)
    src_offsets: np.ndarray  # (n + 1,) int64
    tgt_tokens: np.ndarray
    tgt_offsets: np.ndarray
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    @property
    def src_lens(self) -> np.ndarray:
        """(n,) int64 source lengths in subword tokens, without EOS."""
        return np.diff(self.src_offsets)

    @property
    def tgt_lens(self) -> np.ndarray:
        return np.diff(self.tgt_offsets)

    def src(self, i: int) -> np.ndarray:
        return self.src_tokens[self.src_offsets[i]:self.src_offsets[i + 1]]

    def tgt(self, i: int) -> np.ndarray:
        return self.tgt_tokens[self.tgt_offsets[i]:self.tgt_offsets[i + 1]]


def cache_key(spec: str, cfg: DataConfig, vocab: Vocab, filters: Filters | None) -> str:
    files = []
    for path in corpus_files(spec, cfg.src_lang, cfg.tgt_lang):
        stat = path.stat() if path.exists() else None
        files.append([str(path.resolve()), stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    blob = json.dumps(
        [CACHE_VERSION, spec, cfg.src_lang, cfg.tgt_lang, files, vocab.identity, filters and vars(filters)],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_encode(
    spec: str, name: str, cfg: DataConfig, vocab: Vocab, run_dir: Path, filters: Filters | None
) -> EncodedCorpus:
    """Map the cached encoding of corpus `spec`, encoding it first if no cache matches."""
    key = cache_key(spec, cfg, vocab, filters)
    path = Path(run_dir) / "cache" / f"{name}-{key}"
    if (path / "meta.json").is_file():
        log.info("%s: reusing encoded cache %s", name, path)
        return open_cache(path)
    pairs = read_corpus(spec, cfg.src_lang, cfg.tgt_lang)
    encode_to_cache(pairs, vocab, path, filters, threads=cfg.encode_threads or os.cpu_count() or 1, name=spec)
    return open_cache(path)


def open_cache(path: Path) -> EncodedCorpus:
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])

    def tokens(side: str) -> np.ndarray:
        if (path / f"{side}.bin").stat().st_size == 0:  # np.memmap refuses empty files
            return np.zeros(0, dtype)
        return np.memmap(path / f"{side}.bin", dtype=dtype, mode="r")

    return EncodedCorpus(
        tokens("src"), np.load(path / "src.idx.npy", mmap_mode="r"),
        tokens("tgt"), np.load(path / "tgt.idx.npy", mmap_mode="r"),
        path,
    )


def encode_to_cache(
    pairs: Iterable[Pair], vocab: Vocab, path: Path, filters: Filters | None, threads: int, name: str
) -> dict:
    """Tokenize `pairs` chunk by chunk into the cache directory `path` (written whole, then renamed)."""
    dtype = np.uint16 if max(vocab.src_size, vocab.tgt_size) <= np.iinfo(np.uint16).max else np.int32
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    counts = {"read": 0, "kept": 0, "empty": 0, "too_short": 0, "too_long": 0, "ratio": 0}
    offsets = {"src": [np.zeros(1, np.int64)], "tgt": [np.zeros(1, np.int64)]}
    ends = {"src": 0, "tgt": 0}
    try:
        with open(tmp / "src.bin", "wb") as src_bin, open(tmp / "tgt.bin", "wb") as tgt_bin:
            bins = {"src": src_bin, "tgt": tgt_bin}
            for chunk in _chunks(pairs, CHUNK):
                counts["read"] += len(chunk)
                if filters is not None:
                    nonempty = [(s, t) for s, t in chunk if s.strip() and t.strip()]
                    counts["empty"] += len(chunk) - len(nonempty)
                    chunk = nonempty
                if not chunk:
                    continue
                src_ids = vocab.src.encode([s for s, _ in chunk], num_threads=threads)
                tgt_ids = vocab.tgt.encode([t for _, t in chunk], num_threads=threads)
                src_len = np.fromiter(map(len, src_ids), np.int64, len(src_ids))
                tgt_len = np.fromiter(map(len, tgt_ids), np.int64, len(tgt_ids))
                keep = _apply_filters(src_len, tgt_len, filters, counts)
                kept = np.flatnonzero(keep) if not keep.all() else None
                for side, ids, lens in (("src", src_ids, src_len), ("tgt", tgt_ids, tgt_len)):
                    if kept is not None:
                        ids = [ids[i] for i in kept]
                        lens = lens[kept]
                    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lens.sum()))
                    bins[side].write(flat.tobytes())
                    offsets[side].append(ends[side] + np.cumsum(lens))
                    ends[side] += int(lens.sum())
                counts["kept"] += int(keep.sum())
        if counts["read"] == 0:
            raise MTError(f"{name}: the corpus is empty")
        if counts["kept"] == 0:
            raise MTError(f"{name}: every one of the {counts['read']} pairs was removed by the filters ({_dropped(counts)})")
        for side in ("src", "tgt"):
            np.save(tmp / f"{side}.idx.npy", np.concatenate(offsets[side]))
        meta = {"dtype": np.dtype(dtype).name, "counts": counts, "vocab": vocab.identity,
                "filters": filters and vars(filters)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if path.exists():  # a stale cache under the same key (a crashed earlier write is never named `path`)
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: encoded %d of %d pairs (dropped %s)", name, counts["kept"], counts["read"], _dropped(counts))
    return counts


def _apply_filters(src_len: np.ndarray, tgt_len: np.ndarray, filters: Filters | None, counts: dict) -> np.ndarray:
    """Boolean mask of pairs to keep; each dropped pair is counted under the first filter it fails."""
    keep = np.ones(len(src_len), bool)
    if filters is None:
        return keep
    shortest, longest = np.minimum(src_len, tgt_len), np.maximum(src_len, tgt_len)
    for reason, bad in (
        ("too_short", shortest < filters.min_len),
        ("too_long", longest > filters.max_len),
        ("ratio", longest > filters.max_len_ratio * np.maximum(shortest, 1)),
    ):
        counts[reason] += int((bad & keep).sum())
        keep &= ~bad
    return keep


def _dropped(counts: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')}: {counts[k]}" for k in ("empty", "too_short", "too_long", "ratio"))


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
