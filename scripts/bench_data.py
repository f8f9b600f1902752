"""Benchmark: encode a WMT14-sized corpus (4.5M pairs) into mt's cache; print wall time and peak memory.

    python scripts/bench_data.py [--pairs 4500000] [--dir bench-data]

Generates a synthetic parallel corpus once (Zipf-distributed made-up words, sentence lengths like WMT's),
learns a 32k joint SentencePiece model from a sample, then encodes the whole corpus with the same code
`mt train` uses. Each phase runs in its own process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def generate(out: Path, pairs: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    n_words = 60_000
    lengths = rng.integers(2, 12, n_words)
    vocab = ["".join(rng.choice(letters, n)) for n in lengths]
    for side in ("src", "tgt"):
        with open(out / f"train.{side}", "w", encoding="utf-8") as f:
            done = 0
            while done < pairs:
                n = min(100_000, pairs - done)
                sent_lens = np.clip(rng.lognormal(3.0, 0.55, n).astype(int), 1, 120)  # mean ~23 words
                words = np.minimum(rng.zipf(1.2, int(sent_lens.sum())) - 1, n_words - 1)
                cuts = np.cumsum(sent_lens)[:-1]
                f.write("\n".join(" ".join(vocab[w] for w in s) for s in np.split(words, cuts)) + "\n")
                done += n


def phase(name: str, directory: Path) -> dict:
    from mt.config import DataConfig
    from mt.data.cache import Filters, load_or_encode
    from mt.data.vocab import load_or_train_vocab

    cfg = DataConfig(src_lang="src", tgt_lang="tgt", train=str(directory / "train"), vocab_size=32000,
                     spm_max_sentences=1_000_000, max_len=250)
    start = time.time()
    vocab = load_or_train_vocab(cfg, directory / "run")
    if name == "encode":
        start = time.time()
        corpus = load_or_encode(cfg.train, "train", cfg, vocab, directory / "run", Filters.from_config(cfg))
        extra = {"pairs_kept": len(corpus), "tokens": int(corpus.src_offsets[-1] + corpus.tgt_offsets[-1])}
    else:
        extra = {"pieces": vocab.src_size}
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"phase": name, "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2), **extra}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4_500_000)
    ap.add_argument("--dir", default="bench-data")
    ap.add_argument("--phase", choices=("vocab", "encode"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    directory = Path(args.dir) / f"synthetic-{args.pairs}"
    if args.phase:
        print(json.dumps(phase(args.phase, directory)))
        return 0
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "train.tgt").is_file():
        start = time.time()
        generate(directory, args.pairs)
        print(f"generated {args.pairs} synthetic pairs in {time.time() - start:.0f} s -> {directory}")
    for cache in (directory / "run" / "cache").glob("train-*"):  # always measure a cold encode
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    for name in ("vocab", "encode"):
        out = subprocess.run([sys.executable, __file__, "--pairs", str(args.pairs), "--dir", args.dir,
                              "--phase", name], check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("phase", "seconds", "peak_rss_gib"))
        print(f"{name:7s} {r['seconds'] / 60:6.2f} min   peak RSS {r['peak_rss_gib']:.2f} GiB   {extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
