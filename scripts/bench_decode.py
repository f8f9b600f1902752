"""Decoding speed against CTranslate2 on the same weights: `mt translate` at each precision and CTranslate2
float32 and int8 (the checkpoint converted by `mt export --format ct2`), beam 4, one fresh process per run.

    pip install -e ".[export]" -c <(echo torch==$(python -c 'import torch; print(torch.__version__)'))
    python scripts/bench_decode.py --checkpoint runs/multi30k-de-en/checkpoint_avg.pt
    python scripts/bench_decode.py --checkpoint CKPT --isa avx2      # as on a CPU without AVX512

Each repetition runs every system once, in turns (by default mt fp32, int8, and bf16 where the CPU has native
bf16 matrix products, each with exact search and with early stop; CTranslate2 float32 and int8, each also
reranked as below), each in a new process that loads the model, then times the translation of --src alone
(tokenisation and detokenisation included, loading excluded). Prints sentences/s (the median over
repetitions), BLEU against --ref, its difference from mt fp32's and the share of lines identical to mt
fp32's. CTranslate2 runs as a user would run it: `translate_batch` over the whole input with --max-tokens
token batches (it sorts by length itself), beam 4, length penalty 0.6 (its formula: length^0.6).

Other systems: "mt fp32 early" (any mt precision) stops each sentence as CTranslate2 does (`decode.early_stop`),
not exactly. "ct2 float32 rerank" is CTranslate2 made to give mt's output, the fair comparison for mt's exact
search: beams ranked by summed log-probability (length penalty 0), patience 2 so that it runs until 8 of them
are finished, all 8 returned and the best picked by mt's length penalty ((5 + |Y|) / 6)^0.6, EOS counted.
"ct2 int8 rerank" is the same search on int8 weights, to set against mt's exact search at int8 and bf16.

--isa avx2 restricts both engines to AVX2 kernels (ATEN_CPU_CAPABILITY, CT2_FORCE_CPU_ISA, oneDNN's
ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS): the instruction set of a CPU without AVX512, on this CPU's cores
and caches, which is not the same as an AVX2 CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k"
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "CT2_FORCE_CPU_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def worker(args: argparse.Namespace) -> None:
    """One timed run: translate --src with --system, write the output to --hyp, print the seconds as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    sources = (Path(args.src).read_text(encoding="utf-8").splitlines())[:args.lines or None]
    if args.system.startswith("mt"):
        from mt.translate import load_translator, translate_lines

        precision = args.system.split()[1]
        translator = load_translator(args.checkpoint, search_overrides=[
            "decode.method=beam", "decode.beam_size=4", f"decode.max_tokens={args.max_tokens}",
            f"decode.precision={precision}", f"decode.early_stop={'early' in args.system}"])
        started = time.perf_counter()
        hyps = translate_lines(translator, sources)
    else:
        import ctranslate2
        import sentencepiece as spm

        directory = Path(args.ct2_dir)
        src_spm = spm.SentencePieceProcessor(model_file=str(directory / "source.spm"))
        tgt_spm = spm.SentencePieceProcessor(model_file=str(directory / "target.spm"))
        translator = ctranslate2.Translator(str(directory), device="cpu", inter_threads=1,
                                            intra_threads=args.threads)
        rerank = "rerank" in args.system
        options = dict(length_penalty=0.0, patience=2, num_hypotheses=8, return_scores=True) if rerank else \
            dict(length_penalty=0.6)
        started = time.perf_counter()
        results = translator.translate_batch(src_spm.encode(sources, out_type=str), beam_size=4,
                                             max_batch_size=args.max_tokens, batch_type="tokens", **options)
        if rerank:  # mt's ranking: summed log-prob over GNMT's penalty of the length with EOS
            hyps = [tgt_spm.decode(max(zip(r.hypotheses, r.scores),
                                       key=lambda h: h[1] / ((6 + len(h[0])) / 6) ** 0.6)[0]) for r in results]
        else:
            hyps = [tgt_spm.decode(r.hypotheses[0]) for r in results]
    seconds = time.perf_counter() - started
    Path(args.hyp).write_text("\n".join(hyps) + "\n", encoding="utf-8")
    print(json.dumps({"seconds": seconds}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--src", type=Path, default=DATA / "test_2016_flickr.de")
    parser.add_argument("--ref", type=Path, default=DATA / "test_2016_flickr.en")
    parser.add_argument("--lines", type=int, default=0, help="only the first N lines (0: all)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8192, help="source tokens per batch, both engines")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native")
    parser.add_argument("--systems", nargs="+",
                        default=["mt fp32", "mt fp32 early", "mt int8", "mt int8 early", "mt bf16", "mt bf16 early",
                                 "ct2 float32", "ct2 float32 rerank", "ct2 int8", "ct2 int8 rerank"])
    parser.add_argument("--work", type=Path, help="exports and outputs (default: beside the checkpoint)")
    # A worker's own arguments (internal).
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--hyp", help=argparse.SUPPRESS)
    parser.add_argument("--ct2-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.system:
        worker(args)
        return 0

    import torch

    from mt.evaluate import score
    from mt.export import export
    from mt.runtime import native_bf16

    env = {**os.environ, **ISA_ENV.get(args.isa, {})}
    bf16 = native_bf16(torch.device("cpu")) and args.isa == "native"
    systems = [s for s in args.systems if not s.startswith("mt bf16") or bf16]
    work = args.work or args.checkpoint.parent / "bench_decode"
    work.mkdir(parents=True, exist_ok=True)
    ct2_dirs = {q: export(args.checkpoint, "ct2", work / f"ct2-{q}", None if q == "float32" else q, force=True)
                for q in ("float32", "int8") if any(s.startswith(f"ct2 {q}") for s in systems)}
    seconds: dict[str, list[float]] = {s: [] for s in systems}
    for rep in range(args.reps):
        for system in systems:
            hyp = work / f"{system.replace(' ', '-')}.hyp"
            command = [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--src", str(args.src),
                       "--lines", str(args.lines), "--threads", str(args.threads), "--max-tokens",
                       str(args.max_tokens), "--system", system, "--hyp", str(hyp)]
            if system.startswith("ct2"):
                command += ["--ct2-dir", str(ct2_dirs[system.split()[1]])]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return 1
            seconds[system].append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
            print(f"rep {rep + 1}: {system}: {seconds[system][-1]:.2f} s", file=sys.stderr)

    refs = args.ref.read_text(encoding="utf-8").splitlines()[:args.lines or None]
    hyps = {s: (work / f"{s.replace(' ', '-')}.hyp").read_text(encoding="utf-8").splitlines() for s in systems}
    reference = hyps.get("mt fp32")
    print(f"\n{args.checkpoint}, {args.src.name} ({len(refs)} lines), beam 4, {args.threads} threads, "
          f"{args.max_tokens}-token batches, ISA {args.isa}, torch {torch.__version__}\n")
    bleu = {s: score(hyps[s], refs).bleu for s in systems}
    print("| system | sentences/s (median) | seconds per run | BLEU | BLEU - mt fp32 | lines identical to mt fp32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in systems:
        same = f"{100 * sum(a == b for a, b in zip(hyps[s], reference)) / len(refs):.1f}%" if reference else "-"
        delta = f"{bleu[s] - bleu['mt fp32']:+.2f}" if reference else "-"
        runs = ", ".join(f"{x:.2f}" for x in seconds[s])
        print(f"| {s} | {len(refs) / statistics.median(seconds[s]):.1f} | {runs} | {bleu[s]:.2f} | {delta} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
