"""Download Multi30k (task 1, raw text) for machines that have no local copy of ../shared/data/multi30k.

    python scripts/get_multi30k.py data/multi30k

Fetches the gzip files of the multi30k/dataset repository and writes train/val/test_2016_flickr .de/.en/.fr
as plain UTF-8 text, each file atomically.
"""

from __future__ import annotations

import gzip
import sys
import urllib.request
from pathlib import Path

BASE = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
SPLITS = ("train", "val", "test_2016_flickr")
LANGS = ("de", "en", "fr")


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        for lang in LANGS:
            target = out / f"{split}.{lang}"
            if target.is_file():
                continue
            url = f"{BASE}/{split}.{lang}.gz"
            try:
                with urllib.request.urlopen(url, timeout=60) as r:
                    text = gzip.decompress(r.read())
            except OSError as e:
                print(f"get_multi30k: error: could not download {url}: {e}", file=sys.stderr)
                return 1
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(text)
            tmp.replace(target)
            print(f"{target}: {len(text.splitlines())} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "data/multi30k"))
