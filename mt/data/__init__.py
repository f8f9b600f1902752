"""The data pipeline: corpora -> SentencePiece -> encoded cache -> token batches.

    corpus.py    read WMT-style file pairs, TSV and Hugging Face datasets as (source, target) strings
    vocab.py     learn or reuse the SentencePiece model(s) of a run directory
    cache.py     tokenize and filter once into memory-mapped arrays
    batching.py  token-budget batches, bucketed by length, deterministic and resumable

`prepare_data` ties them together for `mt train`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mt.config import DataConfig
from mt.data.batching import (Batch, BatchStats, batch_stats, collate, iterate_batches, make_batches,
                              pad_sentences)
from mt.data.cache import EncodedCorpus, Filters, load_or_encode
from mt.data.corpus import read_corpus
from mt.data.vocab import BOS, EOS, PAD, UNK, Vocab, load_or_train_vocab

log = logging.getLogger(__name__)

__all__ = [
    "BOS", "EOS", "PAD", "UNK", "Batch", "BatchStats", "EncodedCorpus", "Filters", "PreparedData", "Vocab",
    "batch_stats", "collate", "iterate_batches", "make_batches", "pad_sentences", "prepare_data", "read_corpus",
]


@dataclass
class PreparedData:
    vocab: Vocab
    train: EncodedCorpus
    valid: EncodedCorpus | None


def prepare_data(cfg: DataConfig, run_dir: str | Path) -> PreparedData:
    """Learn (or reuse) the vocabulary and encode (or map) the training and dev sets.

    The training set is filtered by length; the dev set is kept whole, since its scores must be comparable
    with other systems'.
    """
    run_dir = Path(run_dir)
    vocab = load_or_train_vocab(cfg, run_dir)
    train = load_or_encode(cfg.train, "train", cfg, vocab, run_dir, Filters.from_config(cfg))
    valid = load_or_encode(cfg.valid, "valid", cfg, vocab, run_dir, None) if cfg.valid else None
    return PreparedData(vocab, train, valid)
