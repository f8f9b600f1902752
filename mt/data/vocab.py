"""SentencePiece vocabularies: learned once per run directory, then reused and checked against the config.

The paper shares one source-target vocabulary (Section 5.1: "a shared source-target vocabulary of about
37000 tokens"), which lets the three embedding matrices be tied (Section 3.4); `data.joint_vocab: false`
learns one model per side instead. Special ids are fixed so checkpoints and caches agree on them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from mt.config import DataConfig
from mt.data.corpus import read_corpus
from mt.errors import MTError
from mt.io import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = 0, 1, 2, 3

# The config keys that shape a learned vocabulary; a run directory's vocabulary must match them.
VOCAB_KEYS = ("train", "src_lang", "tgt_lang", "joint_vocab", "vocab_size", "spm_model_type", "character_coverage")


@dataclass
class Vocab:
    """The source and target SentencePiece models (the same object twice when the vocabulary is joint)."""

    src: spm.SentencePieceProcessor
    tgt: spm.SentencePieceProcessor
    joint: bool
    src_proto: bytes
    tgt_proto: bytes

    @property
    def src_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_size(self) -> int:
        return self.tgt.get_piece_size()

    @property
    def identity(self) -> str:
        """A short hash of the model files: caches and checkpoints record it to detect a changed vocabulary."""
        h = hashlib.sha256(self.src_proto)
        if not self.joint:
            h.update(self.tgt_proto)
        return h.hexdigest()[:16]

    @classmethod
    def from_protos(cls, src_proto: bytes, tgt_proto: bytes | None = None) -> "Vocab":
        """Rebuild from serialized models (as stored in a checkpoint); `tgt_proto=None` means joint."""
        src = spm.SentencePieceProcessor(model_proto=src_proto)
        if tgt_proto is None:
            return cls(src, src, True, src_proto, src_proto)
        return cls(src, spm.SentencePieceProcessor(model_proto=tgt_proto), False, src_proto, tgt_proto)


def model_paths(run_dir: Path, joint: bool) -> tuple[Path, Path]:
    if joint:
        return run_dir / "spm.model", run_dir / "spm.model"
    return run_dir / "spm.src.model", run_dir / "spm.tgt.model"


def load_or_train_vocab(cfg: DataConfig, run_dir: Path) -> Vocab:
    """Reuse the run directory's SentencePiece model(s) if they match the config, else learn them."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "spm.json"
    wanted = {key: getattr(cfg, key) for key in VOCAB_KEYS}
    src_path, tgt_path = model_paths(run_dir, cfg.joint_vocab)
    if meta_path.is_file():
        have = json.loads(meta_path.read_text(encoding="utf-8"))
        changed = [k for k in VOCAB_KEYS if have.get(k) != wanted[k]]
        if changed:
            key = changed[0]
            raise MTError(
                f"{meta_path}: the vocabulary in this run directory was learned with data.{key} = {have.get(key)!r}, "
                f"the config asks for {wanted[key]!r}; use a new run_dir or delete {run_dir}/spm.*"
            )
        if src_path.is_file() and tgt_path.is_file():
            log.info("reusing SentencePiece model %s", src_path if cfg.joint_vocab else f"{src_path}, {tgt_path}")
            return Vocab.from_protos(src_path.read_bytes(), None if cfg.joint_vocab else tgt_path.read_bytes())

    def side(index: int) -> Iterator[str]:
        for pair in read_corpus(cfg.train, cfg.src_lang, cfg.tgt_lang):
            if pair[0].strip() and pair[1].strip():
                yield pair[index]

    def both() -> Iterator[str]:
        for s, t in read_corpus(cfg.train, cfg.src_lang, cfg.tgt_lang):
            if s.strip() and t.strip():
                yield s
                yield t

    threads = cfg.encode_threads or os.cpu_count() or 1
    if cfg.joint_vocab:
        proto = train_sentencepiece(both(), cfg, threads)
        vocab = Vocab.from_protos(proto)
        protos = {src_path: proto}
    else:
        src_proto = train_sentencepiece(side(0), cfg, threads)
        tgt_proto = train_sentencepiece(side(1), cfg, threads)
        vocab = Vocab.from_protos(src_proto, tgt_proto)
        protos = {src_path: src_proto, tgt_path: tgt_proto}
    for path, proto in protos.items():
        with atomic_open(path, "wb") as f:
            f.write(proto)
    atomic_write_text(meta_path, json.dumps(wanted, indent=1) + "\n")
    log.info("learned SentencePiece model (%s, %d pieces) -> %s", cfg.spm_model_type, vocab.tgt_size, src_path)
    return vocab


def train_sentencepiece(sentences: Iterable[str], cfg: DataConfig, threads: int) -> bytes:
    """Learn one SentencePiece model from `sentences`; returns the serialized model.

    SentencePiece itself samples `spm_max_sentences` of them, so a WMT-sized corpus streams through without
    being held in memory. `hard_vocab_limit=False` lets a small corpus yield fewer pieces than asked
    instead of failing; the model's real size is what the network is built with.
    """
    model = io.BytesIO()
    count = 0
    failure: MTError | None = None

    def counted() -> Iterator[str]:
        # SentencePiece turns an exception raised by the iterator into a multi-line RuntimeError
        # ("INTERNAL: MTError: ... At: file(line)"); keep the reader's own error to re-raise it as it was.
        nonlocal count, failure
        try:
            for s in sentences:
                count += 1
                yield s
        except MTError as e:
            failure = e
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(),
            model_writer=model,
            vocab_size=cfg.vocab_size,
            model_type=cfg.spm_model_type,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.spm_max_sentences,
            shuffle_input_sentence=True,
            hard_vocab_limit=False,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            num_threads=threads,
            minloglevel=2,
        )
    except MTError:
        raise
    except RuntimeError as e:
        if failure is not None:
            raise failure from None
        if count == 0:
            raise MTError(f"{cfg.train}: no non-empty sentence pairs to learn a vocabulary from") from None
        raise MTError(f"{cfg.train}: SentencePiece could not learn a vocabulary: {str(e).strip()}") from None
    return model.getvalue()
