"""Reading parallel corpora: WMT-style file pairs, tab-separated pairs and Hugging Face `datasets`.

A corpus is named by one string, so a config can point at any of the three forms:

    PREFIX                    PREFIX.{src}, PREFIX.{tgt}: one sentence per line, line i translates line i
                              (each file plain or gzip-compressed as PREFIX.{lang}.gz)
    FILE.tsv / FILE.tsv.gz    one "source<TAB>target" pair per line
    hf:NAME[:CONFIG[:SPLIT]]  a Hugging Face dataset: a hub name (`hf:wmt14:de-en:train`), a local data file
                              (`hf:pairs.jsonl`, `.json`, `.csv`, `.parquet`) or a directory written by
                              `Dataset.save_to_disk`. Rows hold either a `translation` dict keyed by language
                              (the WMT datasets' layout) or one column per language.

Every reader yields `(source, target)` string pairs and raises `MTError` naming the file and line for
invalid UTF-8, a malformed line, a missing file or mismatched line counts.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Iterator

from mt.errors import MTError
from mt.io import read_lines

log = logging.getLogger(__name__)

Pair = tuple[str, str]
HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def read_corpus(spec: str, src_lang: str, tgt_lang: str) -> Iterator[Pair]:
    """Yield the `(source, target)` pairs of the corpus named by `spec` (see the module docstring)."""
    if not spec:
        raise MTError("no corpus given (set data.train / data.valid in the config)")
    if spec.startswith("hf:"):
        return _read_hf(spec, src_lang, tgt_lang)
    if spec.endswith((".tsv", ".tsv.gz")):
        return _read_tsv(Path(spec))
    return _read_pair(side_path(spec, src_lang), side_path(spec, tgt_lang))


def side_path(prefix: str, lang: str) -> Path:
    """PREFIX.lang, or PREFIX.lang.gz when only the compressed file exists."""
    plain = Path(f"{prefix}.{lang}")
    gz = Path(f"{prefix}.{lang}.gz")
    if plain.is_file() or not gz.is_file():
        return plain  # a missing file is reported by read_lines with this, the expected, name
    return gz


def corpus_files(spec: str, src_lang: str, tgt_lang: str) -> list[Path]:
    """The local files a corpus reads, for cache keys; empty for a hub dataset."""
    if spec.startswith("hf:"):
        name = spec[3:].split(":")[0]
        path = Path(name)
        if path.is_dir():
            return sorted(p for p in path.rglob("*") if p.is_file())
        return [path] if path.is_file() else []
    if spec.endswith((".tsv", ".tsv.gz")):
        return [Path(spec)]
    return [side_path(spec, src_lang), side_path(spec, tgt_lang)]


def _read_pair(src_path: Path, tgt_path: Path) -> Iterator[Pair]:
    # Open both before yielding anything so a missing second file is reported before any work is done.
    for path in (src_path, tgt_path):
        if not path.is_file():
            raise MTError(f"{path}: file not found")
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    n = 0
    for n, (source, target) in enumerate(itertools.zip_longest(src, tgt), start=1):
        if source is None or target is None:
            longer, shorter = (tgt_path, src_path) if source is None else (src_path, tgt_path)
            rest = sum(1 for _ in (tgt if source is None else src))
            raise MTError(
                f"{shorter}: has {n - 1} lines but {longer} has {n + rest}: "
                "the two sides of a parallel corpus must have the same number of lines"
            )
        yield source, target


def _read_tsv(path: Path) -> Iterator[Pair]:
    for number, line in enumerate(read_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise MTError(f"{path}:{number}: expected 2 tab-separated fields, found {len(fields)}")
        yield fields[0], fields[1]


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG[:SPLIT]]' -> (name, config or None, split); the split defaults to 'train'."""
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise MTError(f"{spec}: expected hf:NAME[:CONFIG[:SPLIT]], e.g. hf:wmt14:de-en:train")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def load_hf_dataset(spec: str):
    """Load the `datasets.Dataset` a `hf:` spec names: a saved directory, a local data file, or the hub.

    All three end in the same row reader, so the hub path (which needs the internet) is exercised by the
    local forms in the tests.
    """
    import datasets  # imported here: it is slow to import and only this path needs it

    name, config, split = parse_hf_spec(spec)
    path = Path(name)
    try:
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise MTError(f"{path}: no split '{split}' (has {', '.join(dataset)})")
                dataset = dataset[split]
            return dataset
        if path.suffix in HF_FILE_BUILDERS:
            if not path.is_file():
                raise MTError(f"{path}: file not found")
            return datasets.load_dataset(HF_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
        return datasets.load_dataset(name, config, split=split)
    except MTError:
        raise
    except Exception as e:  # the hub raises many types (connection, missing config, missing split)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MTError(f"{spec}: could not load the Hugging Face dataset: {first}") from None


def _read_hf(spec: str, src_lang: str, tgt_lang: str) -> Iterator[Pair]:
    dataset = load_hf_dataset(spec)
    columns = dataset.column_names
    if "translation" in columns:
        def pairs(batch: dict) -> Iterator[Pair]:
            for row in batch["translation"]:
                yield row[src_lang], row[tgt_lang]

        first = dataset[0]["translation"] if len(dataset) else None  # an empty dataset is an empty corpus, reported later
        missing = [lang for lang in (src_lang, tgt_lang) if first is not None and lang not in first]
        if missing:
            raise MTError(f"{spec}: the translation column has no '{missing[0]}' (has {', '.join(first)})")
    elif src_lang in columns and tgt_lang in columns:
        def pairs(batch: dict) -> Iterator[Pair]:
            yield from zip(batch[src_lang], batch[tgt_lang])
    else:
        raise MTError(
            f"{spec}: expected a 'translation' column or columns '{src_lang}' and '{tgt_lang}', "
            f"found {', '.join(columns)}"
        )
    number = 0
    for batch in dataset.iter(batch_size=10_000):
        for source, target in pairs(batch):
            number += 1
            if not isinstance(source, str) or not isinstance(target, str):
                raise MTError(f"{spec}: row {number} holds a non-string value")
            yield source, target
