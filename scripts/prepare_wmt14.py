"""Fetch and prepare WMT14 English-German for configs/base.yaml and configs/big.yaml.

    python scripts/prepare_wmt14.py                          # online: ~4.5M pairs + newstest2013/2014
    python scripts/prepare_wmt14.py --sample ../shared/data/wmt-sample --out data/wmt14-sample

Training data comes through Hugging Face `datasets` (`wmt14`, `de-en`, split `train`); the configs read it
directly as `hf:wmt14:de-en:train`, and this script loads it once so the download happens here and the
number of pairs is checked. newstest2013 (dev) and newstest2014 (test) come through sacreBLEU and are written
as `OUT/newstest2013.{en,de}` and `OUT/newstest2014.{en,de}`, the prefixes the configs name.

`--sample DIR` runs the same code path without the internet: DIR's WMT-style `train.{en,de}` is written as a
JSON-lines file in the hub's layout (one `translation` dict per row) and loaded back through `datasets`, and
DIR's `val` split stands in for both newstests. It prints the `--set` overrides that point a config at it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mt.data.corpus import load_hf_dataset, read_corpus  # noqa: E402
from mt.errors import MTError  # noqa: E402
from mt.io import atomic_open  # noqa: E402


def write_split(prefix: Path, pairs, src: str = "en", tgt: str = "de") -> int:
    n = 0
    with atomic_open(f"{prefix}.{src}") as fs, atomic_open(f"{prefix}.{tgt}") as ft:
        for s, t in pairs:
            fs.write(s.replace("\n", " ") + "\n")
            ft.write(t.replace("\n", " ") + "\n")
            n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/wmt14", help="where the newstest files go (default data/wmt14)")
    ap.add_argument("--sample", help="a local WMT-style folder (train.en/de, val.en/de) instead of the hub")
    ap.add_argument("--test-set", default="wmt14/full",
                    help="sacreBLEU name of newstest2014 (default wmt14/full: all 3,003 sentences)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.sample:
            sample = Path(args.sample)
            jsonl = out / "train.jsonl"
            with atomic_open(jsonl) as f:
                for en, de in read_corpus(str(sample / "train"), "en", "de"):
                    f.write(json.dumps({"translation": {"de": de, "en": en}}, ensure_ascii=False) + "\n")
            train_spec = f"hf:{jsonl}"
            for name in ("newstest2013", "newstest2014"):
                write_split(out / name, read_corpus(str(sample / "val"), "en", "de"))
        else:
            from mt.evaluate import load_test_set

            train_spec = "hf:wmt14:de-en:train"
            for name, test_set in (("newstest2013", "wmt13"), ("newstest2014", args.test_set)):
                sources, refs = load_test_set(test_set, "en-de")
                print(f"{out / name}.{{en,de}}: {write_split(out / name, zip(sources, refs[0]))} lines ({test_set})")
        # The same reader `mt train` uses: hub rows and local rows go through one function.
        n = len(load_hf_dataset(train_spec))
        first = next(iter(read_corpus(train_spec, "en", "de")))
    except MTError as e:
        print(f"prepare_wmt14: error: {e}", file=sys.stderr)
        return 2
    print(f"training data {train_spec}: {n} pairs; first: {first[0][:60]!r} -> {first[1][:60]!r}")
    print(f"train with: mt train --config configs/base.yaml --set data.train={train_spec} "
          f"--set data.valid={out / 'newstest2013'} --set data.test={out / 'newstest2014'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
