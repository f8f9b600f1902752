"""Does `mt translate` stream stdin? Peak memory for growing inputs fed to it on stdin, each in a fresh process.

    python scripts/bench_translate_memory.py [--checkpoint runs/multi30k-de-en/checkpoint_last.pt]
                                              [--lines 10000 30000 100000]

The input is Multi30k's German training side repeated up to each line count, given as
`mt translate --checkpoint C < input`. Without --checkpoint, a tiny model is trained for a
few steps first (an untrained model translates just as much text; its output length is capped by
--max-len-b, so the run takes a minute instead of an hour). Prints, per input size, the peak RSS of the
translating process, the time, and the output line count: flat memory means the last column stays put.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k"


def tiny_checkpoint(work: Path) -> Path:
    run = work / "tiny"
    subprocess.run([sys.executable, "-m", "mt", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                    "--set", f"run_dir={run}", "--set", f"data.train={DATA / 'val'}",
                    "--set", f"data.valid={DATA / 'val'}", "--set", "train.max_steps=5",
                    "--set", "train.average_last=0", "--set", "train.valid_bleu=false"],
                   check=True, capture_output=True)
    return run / "checkpoint_last.pt"


def measure(checkpoint: Path, text: Path, beam: int, max_len_b: int) -> tuple[float, float, int]:
    """(peak RSS MiB of the translating process, seconds, output lines), in a child that runs the pipe."""
    code = (
        "import resource, subprocess, sys, time\n"
        "start = time.time()\n"
        f"src = open({str(text)!r}, 'rb')\n"
        f"p = subprocess.run([{sys.executable!r}, '-m', 'mt', 'translate', '--checkpoint', {str(checkpoint)!r},"
        f" '--beam-size', '{beam}', '--set', 'decode.max_len_b={max_len_b}', '--quiet'],"
        " stdin=src, stdout=subprocess.PIPE, check=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.time() - start,"
        " p.stdout.count(b'\\n'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    rss, seconds, lines = out.stdout.split()
    return float(rss), float(seconds), int(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="default: a tiny model trained for 5 steps")
    ap.add_argument("--lines", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    ap.add_argument("--beam-size", type=int, default=4)
    ap.add_argument("--max-len-b", type=int, default=5, help="output length cap: input length + this")
    args = ap.parse_args()
    source = (DATA / "train.de").read_text(encoding="utf-8").splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(work)
        print(f"checkpoint {checkpoint}, beam {args.beam_size}, output <= input + {args.max_len_b} tokens")
        print(f"{'input lines':>12} {'output lines':>13} {'seconds':>8} {'peak RSS MiB':>13}")
        for n in args.lines:
            text = work / f"input.{n}.de"
            text.write_text("\n".join(itertools.islice(itertools.cycle(source), n)) + "\n", encoding="utf-8")
            rss, seconds, out_lines = measure(checkpoint, text, args.beam_size, args.max_len_b)
            print(f"{n:>12,} {out_lines:>13,} {seconds:>8.1f} {rss:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
