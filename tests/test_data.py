"""Data: corpus readers and their errors, SentencePiece reuse, the encoded cache, token batching."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mt.config import DataConfig
from mt.data import (BOS, EOS, PAD, UNK, batch_stats, collate, iterate_batches, make_batches, prepare_data,
                     read_corpus)
from mt.data import cache as cache_module
from mt.data.cache import Filters, encode_to_cache, open_cache
from mt.data.vocab import load_or_train_vocab
from mt.errors import MTError

from conftest import MULTI30K, write_pairs


def data_cfg(prefix: Path, **kw) -> DataConfig:
    return DataConfig(src_lang="de", tgt_lang="en", train=str(prefix), vocab_size=300, max_len=100, **kw)


# ---- corpora


def test_plain_gzip_tsv_and_hf_forms_give_the_same_pairs(tmp_path):
    prefix = write_pairs(tmp_path / "plain", 30)
    expected = list(read_corpus(str(prefix), "de", "en"))
    assert len(expected) == 30 and expected[0][1].startswith("A group of men")

    gz = tmp_path / "gz"
    for lang in ("de", "en"):
        with gzip.open(f"{gz}.{lang}.gz", "wt", encoding="utf-8") as f:
            f.write(Path(f"{prefix}.{lang}").read_text(encoding="utf-8"))
    assert list(read_corpus(str(gz), "de", "en")) == expected

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in expected), encoding="utf-8")
    assert list(read_corpus(str(tsv), "de", "en")) == expected

    jsonl = tmp_path / "pairs.jsonl"  # the hub's WMT layout: a `translation` dict per row
    jsonl.write_text("".join(json.dumps({"translation": {"de": s, "en": t}}) + "\n" for s, t in expected))
    assert list(read_corpus(f"hf:{jsonl}", "de", "en")) == expected

    import datasets  # a saved dataset with one column per language (as e.g. bentrevett/multi30k has)
    datasets.Dataset.from_dict({"de": [s for s, _ in expected], "en": [t for _, t in expected]}).save_to_disk(
        str(tmp_path / "saved"))
    assert list(read_corpus(f"hf:{tmp_path / 'saved'}", "de", "en")) == expected


def test_hub_dataset_that_cannot_load_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MTError) as err:
        list(read_corpus("hf:no-such-user/no-such-dataset:de-en:train", "de", "en"))
    assert str(err.value).startswith("hf:no-such-user/no-such-dataset:de-en:train: could not load")
    assert "\n" not in str(err.value)


def test_hf_rows_without_the_languages_are_an_error(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps({"translation": {"fr": "a", "en": "b"}}) + "\n")
    with pytest.raises(MTError, match="translation column has no 'de'"):
        list(read_corpus(f"hf:{jsonl}", "de", "en"))


@pytest.mark.parametrize("de, en, message", [
    (b"a\nb\nc\n", b"a\nb\n", "x.en: has 2 lines but {dir}/x.de has 3"),
    (b"a\n", b"a\nb\nc\n", "x.de: has 1 lines but {dir}/x.en has 3"),
    (b"gut\nnicht \xff gut\n", b"good\nnot good\n", "x.de:2: invalid UTF-8"),
])
def test_bad_parallel_files_name_the_file_and_line(tmp_path, de, en, message):
    (tmp_path / "x.de").write_bytes(de)
    (tmp_path / "x.en").write_bytes(en)
    with pytest.raises(MTError) as err:
        list(read_corpus(str(tmp_path / "x"), "de", "en"))
    assert message.format(dir=tmp_path) in str(err.value)


def test_missing_file_and_malformed_tsv(tmp_path):
    (tmp_path / "x.de").write_text("a\n")
    with pytest.raises(MTError, match="x.en: file not found"):
        list(read_corpus(str(tmp_path / "x"), "de", "en"))
    (tmp_path / "p.tsv").write_text("a\tb\nno tab here\n")
    with pytest.raises(MTError, match=r"p.tsv:2: expected 2 tab-separated fields, found 1"):
        list(read_corpus(str(tmp_path / "p.tsv"), "de", "en"))


def test_empty_and_all_filtered_corpora_are_errors(tmp_path):
    for lang in ("de", "en"):
        (tmp_path / f"empty.{lang}").write_text("")
    with pytest.raises(MTError, match="no non-empty sentence pairs to learn a vocabulary"):
        prepare_data(data_cfg(tmp_path / "empty"), tmp_path / "run1")
    prefix = write_pairs(tmp_path / "p", 50)
    cfg = data_cfg(prefix)
    vocab = load_or_train_vocab(cfg, tmp_path / "run2")
    with pytest.raises(MTError, match=r"every one of the 50 pairs was removed by the filters \(empty: 0, "
                                      r"too short: 50"):
        cache_module.load_or_encode(str(prefix), "train", cfg, vocab, tmp_path / "run2", Filters(min_len=500,
                                                                                                max_len=600))
    with pytest.raises(MTError, match="the corpus is empty"):
        encode_to_cache(iter([]), vocab, tmp_path / "c", Filters(), 1, "nothing")


# ---- SentencePiece


@pytest.mark.parametrize("joint", [True, False])
def test_vocabulary_has_fixed_special_ids_and_is_reused(tmp_path, joint):
    prefix = write_pairs(tmp_path / "p", 300)
    cfg = data_cfg(prefix, joint_vocab=joint)
    vocab = load_or_train_vocab(cfg, tmp_path / "run")
    for sp in (vocab.src, vocab.tgt):
        assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD, UNK, BOS, EOS)
    files = sorted(p.name for p in (tmp_path / "run").glob("spm*"))
    assert files == (["spm.json", "spm.model"] if joint else ["spm.json", "spm.src.model", "spm.tgt.model"])
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("spm*")}
    again = load_or_train_vocab(cfg, tmp_path / "run")
    assert again.identity == vocab.identity
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("spm*")} == mtimes  # not retrained


def test_a_changed_vocab_setting_on_the_same_run_dir_is_an_error(tmp_path):
    prefix = write_pairs(tmp_path / "p", 300)
    load_or_train_vocab(data_cfg(prefix), tmp_path / "run")
    changed = data_cfg(prefix)
    changed.vocab_size = 400
    with pytest.raises(MTError, match=r"spm.json: the vocabulary in this run directory was learned with "
                                      r"data.vocab_size = 300, the config asks for 400"):
        load_or_train_vocab(changed, tmp_path / "run")


# ---- the encoded cache


def test_cache_holds_the_sentencepiece_encoding_and_is_reused(tmp_path, monkeypatch):
    prefix = write_pairs(tmp_path / "p", 200)
    cfg = data_cfg(prefix)
    data = prepare_data(cfg, tmp_path / "run")
    src_lines = Path(f"{prefix}.de").read_text(encoding="utf-8").splitlines()
    tgt_lines = Path(f"{prefix}.en").read_text(encoding="utf-8").splitlines()
    for i in (0, 57, 199):
        assert data.train.src(i).tolist() == data.vocab.src.encode(src_lines[i])
        assert data.train.tgt(i).tolist() == data.vocab.tgt.encode(tgt_lines[i])
    assert isinstance(data.train.src_tokens, np.memmap)

    def fail(*a, **k):
        raise AssertionError("re-encoded although a matching cache exists")

    monkeypatch.setattr(cache_module, "encode_to_cache", fail)
    again = prepare_data(cfg, tmp_path / "run")
    assert again.train.path == data.train.path
    # A changed corpus file gets a new cache.
    with open(f"{prefix}.en", "a", encoding="utf-8") as f:
        f.write("")
    os.utime(f"{prefix}.en", ns=(1, 1))
    with pytest.raises(AssertionError, match="re-encoded"):
        prepare_data(cfg, tmp_path / "run")


def test_filters_drop_exactly_the_expected_pairs_and_count_them(tmp_path):
    pairs = [("ein hund", "a dog"), ("", "empty source"), ("nur", ""),
             ("a " * 30, "b"),  # ratio 30:1
             ("x " * 120, "y " * 120),  # too long
             ("zwei katzen", "two cats")]
    prefix = write_pairs(tmp_path / "p", 300)
    vocab = load_or_train_vocab(data_cfg(prefix), tmp_path / "run")
    counts = encode_to_cache(iter(pairs), vocab, tmp_path / "c", Filters(min_len=1, max_len=100, max_len_ratio=3.0),
                             1, "handmade")
    assert counts == {"read": 6, "kept": 2, "empty": 2, "too_short": 0, "too_long": 1, "ratio": 1}
    corpus = open_cache(tmp_path / "c")
    assert vocab.tgt.decode(corpus.tgt(1).tolist()) == "two cats"


def test_an_encode_that_fails_midway_leaves_no_cache_behind(tmp_path):
    prefix = write_pairs(tmp_path / "p", 300)
    cfg = data_cfg(prefix)
    vocab = load_or_train_vocab(cfg, tmp_path / "run")
    with open(f"{prefix}.en", "ab") as f:
        f.write(b"broken \xff line\n")
    with open(f"{prefix}.de", "ab") as f:
        f.write(b"kaputte zeile\n")
    with pytest.raises(MTError, match=r"p.en:301: invalid UTF-8"):
        cache_module.load_or_encode(str(prefix), "train", cfg, vocab, tmp_path / "run", Filters())
    assert list((tmp_path / "run" / "cache").iterdir()) == []


# ---- batching


def lengths(n: int = 500, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 40, n), rng.integers(1, 40, n)


def test_every_pair_appears_once_per_epoch_within_the_token_budget():
    src, tgt = lengths()
    batches = make_batches(src, tgt, 300, seed=1, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for b in batches:
        assert len(b) == 1 or (len(b) * (src[b].max() + 1) <= 300 and len(b) * (tgt[b].max() + 1) <= 300)
    # A pair longer than the budget still gets a batch of its own.
    big = make_batches(np.array([5, 400]), np.array([5, 400]), 100, 1, 0)
    assert sorted(len(b) for b in big) == [1, 1]


def test_batch_order_is_a_function_of_seed_and_epoch():
    src, tgt = lengths()
    a = make_batches(src, tgt, 300, seed=1, epoch=0)
    b = make_batches(src, tgt, 300, seed=1, epoch=0)
    c = make_batches(src, tgt, 300, seed=1, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_resuming_mid_epoch_yields_exactly_the_rest_and_shards_are_disjoint(tmp_path):
    prefix = write_pairs(tmp_path / "p", 300)
    data = prepare_data(data_cfg(prefix, max_tokens=256), tmp_path / "run")
    full = [(p, b.indices.tolist()) for p, b, _ in iterate_batches(data.train, 256, 3, 2)]
    tail = [(p, b.indices.tolist()) for p, b, _ in iterate_batches(data.train, 256, 3, 2, start=5)]
    assert tail == full[5:]
    shards = [[b.indices.tolist() for _, b, _ in iterate_batches(data.train, 256, 3, 2, shard=(r, 2))]
              for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(full) // 2
    seen = [i for shard in shards for b in shard for i in b]
    assert len(seen) == len(set(seen))
    assert len(full) - 2 * len(shards[0]) < 2  # at most world - 1 batches wait for another epoch


def test_collate_adds_bos_eos_and_pads():
    from mt.data.cache import EncodedCorpus

    corpus = EncodedCorpus(np.array([7, 8, 9, 5], np.uint16), np.array([0, 3, 4]),
                           np.array([11, 12, 13], np.uint16), np.array([0, 1, 3]))
    b = collate(corpus, np.array([0, 1]))
    assert b.src.tolist() == [[7, 8, 9, EOS], [5, EOS, PAD, PAD]]
    assert b.tgt_in.tolist() == [[BOS, 11, PAD], [BOS, 12, 13]]
    assert b.tgt_out.tolist() == [[11, EOS, PAD], [12, 13, EOS]]
    assert b.n_tgt_tokens == 5


def test_multi30k_batches_are_at_least_90_percent_real_tokens(tmp_path):
    cfg = DataConfig(src_lang="de", tgt_lang="en", train=str(MULTI30K / "train"), vocab_size=8000)
    data = prepare_data(cfg, tmp_path / "run")
    stats = batch_stats(make_batches(data.train.src_lens, data.train.tgt_lens, 4096, 1, 0),
                        data.train.src_lens, data.train.tgt_lens)
    print(f"Multi30k train at 4096 tokens: {stats}")
    assert stats.efficiency >= 0.90
    assert stats.pairs == len(data.train) == 29000
