"""Memory saved by activation checkpointing (`model.activation_checkpointing: true`), measured on the CPU.

    python scripts/bench_checkpointing.py [--d-model 512] [--layers 6] [--tokens 4096]

Runs one training step (forward, backward) of a Transformer of the given size on a random batch of
`--tokens` tokens per side, with and without checkpointing, each in a fresh process, and prints the peak
RSS above the process's RSS just before the step, and the step time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def probe(args) -> dict:
    import torch

    from mt.config import ModelConfig
    from mt.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=args.d_model, n_heads=args.d_model // 64, n_layers=args.layers,
                      d_ff=4 * args.d_model, dropout=0.1, activation_checkpointing=args.checkpointing == "on")
    model = Transformer(cfg, args.vocab, args.vocab, share_all_embeddings=True).train()
    length = 32
    batch = args.tokens // length
    src = torch.randint(4, args.vocab, (batch, length))
    tgt = torch.randint(4, args.vocab, (batch, length))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    logits = model(src, tgt)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten()).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - base) / 1024, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--checkpointing", choices=("on", "off"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.checkpointing:
        print(json.dumps(probe(args)))
        return 0
    results = {}
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--d-model", str(args.d_model), "--layers", str(args.layers),
               "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--checkpointing", mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    off, on = results["off"], results["on"]
    print(f"d_model {args.d_model}, {args.layers}+{args.layers} layers, {args.tokens} tokens per side")
    print(f"without checkpointing: peak +{off['peak_mib']:.0f} MiB, step {off['seconds']:.2f} s")
    print(f"with checkpointing:    peak +{on['peak_mib']:.0f} MiB, step {on['seconds']:.2f} s")
    print(f"saved {off['peak_mib'] - on['peak_mib']:.0f} MiB ({100 * (1 - on['peak_mib'] / off['peak_mib']):.0f}%), "
          f"step time x{on['seconds'] / off['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
