"""Speed, side by side: mt against Hugging Face `MarianMTModel` of the same size (or against mt's own plain
paths), in one run, alternating.

    pip install -e ".[bench]" -c <(echo torch==$(python -c 'import torch; print(torch.__version__)'))
    python scripts/bench.py                    # d_model 256, 3+3 layers (the Multi30k size)
    python scripts/bench.py --size base        # the paper's base size (slow on a CPU)
    python scripts/bench.py --device cuda --size base --max-tokens 8192   # on a GPU (default: the CPU)
    python scripts/bench.py --against plain --plain dropout   # what mt.fast's dropout gains over nn.Dropout

For each system it times (median of --reps repetitions, the two systems back to back in each, in turns):
  * a training step (forward, label-smoothed loss, backward, Adam) on the same Multi30k token batches, each
    system with its own label smoothing (mt's loss as its trainer calls it; HF's Trainer's LabelSmoother),
    fp32 and bf16 autocast: target tokens/s, and mt's model FLOPs utilisation against a matmul peak measured
    in this run;
  * beam-4 decoding of the same 500 test_2016_flickr sentences with the output length fixed (end of
    sentence suppressed for both, so both do the same work), with fp32 weights and with both models cast to
    bf16: sentences/s;
  * peak memory: on a CPU each measurement again in a fresh process, peak RSS above the RSS after set-up
    (Linux); on a GPU the peak of PyTorch's allocator above what was allocated before the measurement.
Prints a table of the medians and, for speed, mt's speedup over HF: the median of the repetitions' own
ratios (see `speedup`); for memory, mt / HF.

`--against plain` replaces HF by mt with the parts named in `--plain` on their plain paths: `dropout`
(nn.Dropout), `attention` (SDPA alone), `loss` (the autograd reference), or `all`. Each fast path of
mt.fast and mt.loss was kept because it pays here.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k"
SIZES = {
    "small": dict(d_model=256, n_heads=4, n_layers=3, d_ff=1024),
    "base": dict(d_model=512, n_heads=8, n_layers=6, d_ff=2048),
}
VOCAB = 8000


# ----------------------------------------------------------------------------------------------------------
# Shared inputs


def prepare(work: Path, max_tokens: int, n_batches: int, n_sentences: int, device: torch.device):
    """Token batches of Multi30k train (on `device`) and the first test sentences, with an 8k joint vocabulary."""
    from mt.config import DataConfig
    from mt.data import collate, make_batches, prepare_data

    cfg = DataConfig(src_lang="de", tgt_lang="en", train=str(DATA / "train"), valid="", vocab_size=VOCAB,
                     max_len=100)
    data = prepare_data(cfg, work)
    order = make_batches(data.train.src_lens, data.train.tgt_lens, max_tokens, seed=1, epoch=0)
    batches = [collate(data.train, b).to(device) for b in order[:n_batches]]
    lines = (DATA / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:n_sentences]
    return data.vocab, batches, lines


PLAIN_PARTS = ("dropout", "attention", "loss")


def build(system: str, size: str, vocab_size: int, plain: tuple[str, ...] = ()):
    """system mt (as `mt train` builds it), plain (mt with the `plain` parts on their plain paths) or hf."""
    from mt.config import ModelConfig

    s = SIZES[size]
    if system in ("mt", "plain"):
        from torch import nn

        from mt.fast import speed_up
        from mt.model import MultiHeadAttention, Transformer, sdpa_attention

        model = speed_up(Transformer(ModelConfig(**s, dropout=0.1), vocab_size, vocab_size, pad_id=0,
                                     share_all_embeddings=True))
        for module in (model.modules() if system == "plain" else ()):
            for name, child in module.named_children():
                if "dropout" in plain and isinstance(child, nn.Dropout):
                    setattr(module, name, nn.Dropout(child.p))
            if "attention" in plain and isinstance(module, MultiHeadAttention):
                module.kernel = sdpa_attention
        return model
    from transformers import MarianConfig, MarianMTModel

    cfg = MarianConfig(
        vocab_size=vocab_size, d_model=s["d_model"], encoder_layers=s["n_layers"], decoder_layers=s["n_layers"],
        encoder_attention_heads=s["n_heads"], decoder_attention_heads=s["n_heads"],
        encoder_ffn_dim=s["d_ff"], decoder_ffn_dim=s["d_ff"], activation_function="relu", dropout=0.1,
        attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=512, scale_embedding=True,
        pad_token_id=0, eos_token_id=3, bos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
        share_encoder_decoder_embeddings=True)
    return MarianMTModel(cfg)


def logits_fn(system: str, model):
    if system != "hf":
        return lambda src, tgt_in: model(src, tgt_in)
    return lambda src, tgt_in: model(input_ids=src, attention_mask=src.ne(0), decoder_input_ids=tgt_in,
                                     decoder_attention_mask=tgt_in.ne(0)).logits


# ----------------------------------------------------------------------------------------------------------
# Measurements


def loss_fn(system: str, plain: tuple[str, ...] = ()):
    """Each system's own label-smoothed cross-entropy (epsilon 0.1), as its users train with it: mt's
    `label_smoothed_loss` (or its plain reference), and the `LabelSmoother` of HF's (Seq2Seq)Trainer.
    (logits (B, T, V), batch) -> loss."""
    if system != "hf":
        from mt.data.vocab import PAD
        from mt.loss import label_smoothed_loss, label_smoothed_loss_reference

        if system == "plain" and "loss" in plain:
            return lambda logits, b: label_smoothed_loss_reference(logits.flatten(0, 1), b.tgt_out.flatten(),
                                                                   0.1)[0] / b.tgt_out.ne(PAD).sum()
        # Divided by a count left on the device: `Batch.n_tgt_tokens` would make the host wait for a GPU.
        return lambda logits, b: label_smoothed_loss(logits.flatten(0, 1), b.tgt_out.flatten(), 0.1,
                                                     reuse_logits=True)[0] / b.tgt_out.ne(PAD).sum()
    from transformers.trainer_pt_utils import LabelSmoother

    smoother = LabelSmoother(epsilon=0.1)
    return lambda logits, b: smoother({"logits": logits}, b.tgt_out.masked_fill(b.tgt_out.eq(0), -100))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock read after it times the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(system: str, model, batches, precision: str, plain: tuple[str, ...] = ()) -> float:
    """Seconds for one pass of training steps over `batches`, each system with its own loss."""
    model.train()
    device = batches[0].src.device
    forward, loss_of = logits_fn(system, model), loss_fn(system, plain)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    sync(device)
    start = time.perf_counter()
    for b in batches:
        with ctx:  # the loss too, as HF's Trainer computes it under autocast
            loss = loss_of(forward(b.src, b.tgt_in), b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def decode_run(system: str, model, vocab, lines: list[str], out_len: int, batch_size: int) -> float:
    """Seconds to beam-4 decode `lines` to exactly `out_len` tokens each."""
    from mt.search import beam_search

    model.eval()
    device = next(model.parameters()).device
    ids = vocab.src.encode(lines)
    order = np.argsort([len(x) for x in ids], kind="stable")
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        chunk = [ids[j] + [3] for j in order[i:i + batch_size]]
        width = max(map(len, chunk))
        src = torch.tensor([x + [0] * (width - len(x)) for x in chunk]).to(device)
        with torch.inference_mode():
            if system != "hf":
                beam_search(model, src, beam_size=4, alpha=0.6, bos=2, eos=3, pad=0,
                            max_len_a=0.0, max_len_b=out_len, min_len=out_len)
            else:
                model.generate(input_ids=src, attention_mask=src.ne(0), num_beams=4, length_penalty=0.6,
                               min_new_tokens=out_len, max_new_tokens=out_len, do_sample=False,
                               early_stopping=False)
    sync(device)
    return time.perf_counter() - start


def in_turn(models: dict, rep: int) -> list[str]:
    """The systems' order in repetition `rep`: mt first in even ones, HF first in odd ones, so that neither
    always runs on the caches (or the clock) the other left."""
    names = list(models)
    return names if rep % 2 == 0 else names[::-1]


def speedup(times: dict[str, list[float]]) -> float:
    """mt's speed over the other system's: the median over repetitions of each repetition's time ratio. The
    two runs of a repetition are back to back, so the machine's drift (mt alone varied by up to 25% between
    repetitions on the 2-core machine) cancels in each ratio, where the ratio of the two medians would keep it."""
    ours, other = times["mt"], next(v for k, v in times.items() if k != "mt")
    return statistics.median(theirs / mine for mine, theirs in zip(ours, other))


def matmul_peak(dtype: torch.dtype, device: torch.device, reps: int = 5) -> float:
    """Measured FLOP/s of a large square matmul (random data): the peak MFU is reported against."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def train_flops(size: str, vocab_size: int, batches) -> float:
    """Model FLOPs (forward + backward) of one pass over `batches`, on their padded shapes, from the model's
    own count (`mt.model.train_flops_per_token`, checked against PyTorch's FlopCounterMode)."""
    from mt.config import ModelConfig
    from mt.model import train_flops_per_token

    cfg = ModelConfig(**SIZES[size])
    return sum(b.tgt_in.numel() * train_flops_per_token(cfg, vocab_size, b.src.size(1), b.tgt_in.size(1))
               for b in batches)


def memory_probe(args) -> None:
    """Run one measurement in this (fresh) process; print the peak RSS above the RSS after set-up."""
    torch.manual_seed(0)
    vocab, batches, lines = prepare(Path(args.work), args.max_tokens, args.train_batches, args.sentences,
                                    torch.device("cpu"))
    model = build(args.system, args.size, vocab.src_size, args.plain)
    # Reset the kernel's high-water mark (Linux), so the peak is the measured work's, not the set-up's.
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    measured_work(args.probe, args.system, model, vocab, batches, lines, args)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - base) / 1024}))


def measured_work(probe: str, system: str, model, vocab, batches, lines: list[str], args) -> None:
    """What peak memory is measured on: fp32 training steps, or beam-decoding one decoding batch."""
    if probe == "train":
        train_run(system, model, batches, "fp32", args.plain)
    else:
        decode_run(system, model, vocab, lines[:args.decode_batch], args.out_len, args.decode_batch)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--train-batches", type=int, default=6)
    ap.add_argument("--sentences", type=int, default=500)
    ap.add_argument("--out-len", type=int, default=20, help="fixed output length for decoding")
    ap.add_argument("--decode-batch", type=int, default=100, help="sentences per decoding batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu (the issue's targets), cuda or cuda:N")
    ap.add_argument("--skip", nargs="*", default=[], choices=("train", "decode", "memory"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--probe", choices=("train", "decode"), help=argparse.SUPPRESS)
    ap.add_argument("--against", choices=("hf", "plain"), default="hf",
                    help="compare mt with Hugging Face (default) or with mt on the --plain paths")
    ap.add_argument("--plain", nargs="+", default=["all"], choices=(*PLAIN_PARTS, "all"),
                    help="with --against plain: the parts that take their plain path (default: all)")
    ap.add_argument("--system", choices=("mt", "hf", "plain"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.plain = PLAIN_PARTS if "all" in args.plain else tuple(args.plain)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        memory_probe(args)
        return 0

    device = torch.device(args.device)
    torch.manual_seed(0)
    vocab, batches, lines = prepare(Path(args.work), args.max_tokens, args.train_batches, args.sentences, device)
    other = args.against
    models = {name: build(name, args.size, vocab.src_size, args.plain).to(device) for name in ("mt", other)}
    n_tokens = sum(b.n_tgt_tokens for b in batches)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"size {args.size} {SIZES[args.size]}, vocab {vocab.src_size}, torch {torch.__version__}, "
          f"{where}; {len(batches)} batches of <= {args.max_tokens} tokens "
          f"({n_tokens} target tokens); {len(lines)} sentences decoded to {args.out_len} tokens, beam 4"
          + (f"; against mt with plain {', '.join(args.plain)}" if other == "plain" else ""))
    rows = []
    if "train" not in args.skip:
        flops = train_flops(args.size, vocab.src_size, batches)
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peak = matmul_peak(dtype, device)
            times = {name: [] for name in models}
            for name in models:  # warm-up
                train_run(name, models[name], batches[:2], precision, args.plain)
            for rep in range(args.reps):
                for name in in_turn(models, rep):
                    times[name].append(train_run(name, models[name], batches, precision, args.plain))
            med = {k: statistics.median(v) for k, v in times.items()}
            mfu = flops / med["mt"] / peak
            rows.append((f"train tokens/s {precision}", n_tokens / med["mt"], n_tokens / med[other], speedup(times),
                         f"mt MFU {100 * mfu:.1f}% of {peak / 1e9:.0f} GFLOP/s matmul"))
    if "decode" not in args.skip:
        for precision in ("fp32", "bf16"):  # bf16: both models' weights cast, as `mt translate --precision bf16`
            cast = {name: copy.deepcopy(m).to(dtype=torch.bfloat16) if precision == "bf16" else m
                    for name, m in models.items()}
            if precision == "bf16" and device.type == "cpu":  # and mt's linear layers as that command's
                from mt.fast import bf16_cpu_linears

                cast = {name: m if name == "hf" else bf16_cpu_linears(m) for name, m in cast.items()}
            times = {name: [] for name in models}
            for name in models:
                decode_run(name, cast[name], vocab, lines[:args.decode_batch], 3, args.decode_batch)
            for rep in range(max(1, args.reps // 2)):
                for name in in_turn(models, rep):
                    times[name].append(decode_run(name, cast[name], vocab, lines, args.out_len, args.decode_batch))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((f"beam-4 sentences/s {precision}", len(lines) / med["mt"], len(lines) / med[other],
                         speedup(times), ""))
    if "memory" not in args.skip and device.type == "cuda":
        # The caching allocator's own peak, in this process: what each measurement adds to what is already held.
        for probe in ("train", "decode"):
            peak = {}
            for name, model in models.items():
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                measured_work(probe, name, model, vocab, batches, lines, args)
                peak[name] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
            rows.append((f"peak memory MiB, {probe} (lower is better)", peak["mt"], peak[other],
                         peak["mt"] / peak[other], ""))
    elif "memory" not in args.skip:
        for probe in ("train", "decode"):
            peak = {}
            for name in models:
                cmd = [sys.executable, __file__, "--probe", probe, "--system", name, "--size", args.size,
                       "--work", args.work, "--max-tokens", str(args.max_tokens), "--train-batches",
                       str(args.train_batches), "--sentences", str(args.sentences), "--out-len",
                       str(args.out_len), "--decode-batch", str(args.decode_batch), "--threads", str(args.threads),
                       "--plain", *args.plain]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                peak[name] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
            rows.append((f"peak memory MiB, {probe} (lower is better)", peak["mt"], peak[other],
                         peak["mt"] / peak[other], ""))

    label = "HF" if other == "hf" else "plain"
    print(f"\n| {'measure':42s} | {'mt':>10s} | {label:>10s} | {'mt/' + label:>8s} | note")
    print(f"|{'-' * 44}|{'-' * 12}|{'-' * 12}|{'-' * 10}|------")
    for what, ours, theirs, ratio, note in rows:
        print(f"| {what:42s} | {ours:10.1f} | {theirs:10.1f} | {ratio:8.2f} | {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
