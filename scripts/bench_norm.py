"""The cost of one normalisation, forward and backward: LayerNorm against RMSNorm as mt computes it
(torch's `rms_norm`), on (tokens, d_model) float32 activations, the residual stream's dtype under autocast.

    python scripts/bench_norm.py                 # 4,096 tokens x 256, one thread
    python scripts/bench_norm.py --d-model 512 --threads 2

Prints milliseconds of process time per forward + backward (the best of --reps runs of 20 calls each):
process time, so another busy process on the machine inflates the figures less than wall time would.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mt.variants import RMSNorm  # noqa: E402


def milliseconds(norm: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        started = time.process_time()
        for _ in range(20):
            norm(x).backward(grad)
        best = min(best, time.process_time() - started)
    return best * 1e3 / 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)
    grad = torch.randn(args.tokens, args.d_model)
    rms = RMSNorm(args.d_model)
    reference = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + rms.eps)
    assert torch.allclose(rms(x), reference, atol=1e-5)  # the same function as mt's model computes
    norms = {"LayerNorm": torch.nn.LayerNorm(args.d_model), "RMSNorm (mt.variants)": rms}
    print(f"torch {torch.__version__}, {args.tokens} x {args.d_model} float32, {args.threads} thread(s)")
    for name, norm in norms.items():
        print(f"{name}: {milliseconds(norm, x, grad, args.reps):.2f} ms forward + backward")
    print(f"RMSNorm's backward: {F.rms_norm(x, (args.d_model,)).grad_fn.name()} (a composite of elementwise "
          "ops where no fused kernel exists)")


if __name__ == "__main__":
    main()
