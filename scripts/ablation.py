"""The ablation table of issue 19: the 2017 model against later changes, each a Multi30k de->en run of the main
job's recipe (configs/multi30k.yaml) under the same time budget.

    python scripts/ablation.py                          # the table: speeds, 7 rows of 20 minutes, 2 of 60
    python scripts/ablation.py --table-only             # the table again from the runs already there
    python scripts/ablation.py --minutes 0.5 --rows paper,swiglu --no-hour --runs runs/ablation-check

On a 2-core CPU two rows at a time, one thread each, train about half as fast again as one row on two threads
(the budgets are steps, so each row trains the steps it would alone); measure the speeds first:

    python scripts/ablation.py --speeds-only
    OMP_NUM_THREADS=1 taskset -c 0 python scripts/ablation.py --rows paper,swiglu,rmsnorm,decoder_only --no-hour &
    OMP_NUM_THREADS=1 taskset -c 1 python scripts/ablation.py --rows pre_norm,rope,all_three --no-hour

and then the two hour runs the same way, one each (`--rows ''` trains no 20-minute row; `best` is the best scored row):

    OMP_NUM_THREADS=1 taskset -c 0 python scripts/ablation.py --rows '' --hour-rows paper &
    OMP_NUM_THREADS=1 taskset -c 1 python scripts/ablation.py --rows '' --hour-rows best

Rows: the 2017 model (post-norm, ReLU, sinusoids, encoder-decoder), pre-norm, RMSNorm (pre-norm placement),
SwiGLU, RoPE, all three of RMSNorm + SwiGLU + RoPE, and decoder-only (a prefix LM with as many layers as
bring its parameters nearest the 2017 model's). Every row has the same data, the same SentencePiece model
(learned once, by the first row, and copied into the others' run directories), the same seed, and a
parameter count within 5% of the 2017 model's (checked before anything trains). Then the best row (by
test BLEU of the averaged checkpoint) and the 2017 model run again for the recipe's hour (of training steps).

The budget is in steps, from speeds measured side by side. First every row's seconds per training step are
measured in one process, the rows taking turns on the same batches (RUNS/speeds.json; kept, so a rerun or a
resumed row has the same budgets). A row then trains for the steps it makes in --minutes of training at its
speed (validation and checkpoints not counted), whatever else the machine does meanwhile: a wall-clock
budget would hand a row the machine's speed at the hour it ran, and a step budget keeps a run deterministic.

Each row runs `mt train` and `mt eval` (test_2016_flickr, beam 4, length penalty 0.6, the last and the
averaged checkpoint) as subprocesses; the table is read from the runs' checkpoints and scores.jsonl, and
printed as markdown (and written to RUNS/table.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mt.checkpoint import count_parameters, load_checkpoint  # noqa: E402
from mt.config import ModelConfig, from_dict, load_config  # noqa: E402
from mt.metrics import read_records  # noqa: E402

# name -> (what the table calls it, the model settings it changes)
ROWS = {
    "paper": ("2017 model (post-norm, ReLU, sinusoids)", {}),
    "pre_norm": ("pre-norm", {"norm": "pre"}),
    "rmsnorm": ("RMSNorm (pre-norm)", {"norm": "rms_pre"}),
    "swiglu": ("SwiGLU (d_ff 2/3)", {"ffn": "swiglu"}),
    "rope": ("RoPE", {"positions": "rope"}),
    "all_three": ("RMSNorm + SwiGLU + RoPE", {"norm": "rms_pre", "ffn": "swiglu", "positions": "rope"}),
    "decoder_only": ("decoder-only (prefix LM)", {"arch": "decoder_only"}),
}
PARAMETER_TOLERANCE = 0.05


def row_settings(name: str, base: ModelConfig, vocab_size: int) -> dict:
    """The row's model settings; for decoder-only, n_layers chosen to bring its parameters nearest `base`'s."""
    settings = dict(ROWS[name][1])
    if settings.get("arch") == "decoder_only":
        target = count_parameters(base, vocab_size)
        settings["n_layers"] = min(range(1, 8 * base.n_layers + 1), key=lambda n: abs(
            count_parameters(dataclasses.replace(base, **settings, n_layers=n), vocab_size) - target))
    return settings


def plan(names: list[str], base: ModelConfig, vocab_size: int) -> dict[str, dict]:
    """Each row's settings, after checking that its parameters are within PARAMETER_TOLERANCE of the 2017 model's."""
    target = count_parameters(base, vocab_size)
    settings = {}
    for name in names:
        settings[name] = row_settings(name, base, vocab_size)
        n = count_parameters(dataclasses.replace(base, **settings[name]), vocab_size)
        print(f"{name}: {n:,} parameters ({100 * (n / target - 1):+.2f}% of the 2017 model's {target:,}) "
              f"{settings[name] or ''}", file=sys.stderr)
        if abs(n / target - 1) > PARAMETER_TOLERANCE:
            sys.exit(f"ablation: {name} has {n:,} parameters, more than {PARAMETER_TOLERANCE:.0%} from {target:,}")
    return settings


def run(command: list[str]) -> None:
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def copy_vocabulary(source: Path, run_dir: Path) -> None:
    """The SentencePiece files of `source` into `run_dir`, each written whole (another invocation may read it)."""
    for path in source.glob("spm.*"):
        partial = run_dir / f".{path.name}.partial"
        shutil.copy2(path, partial)
        os.replace(partial, run_dir / path.name)


def measure_speeds(settings: dict[str, dict], config: Path, overrides: list[str], vocab_from: Path | None,
                   rounds: int, steps: int) -> dict:
    """Each row's seconds per training step and target tokens per second, side by side in this process: one
    Trainer per row, the same first `steps` batches for all, the rows taking turns for `rounds` rounds after three
    warm-up steps each; a row's figure is the median of its rounds. Learns the vocabulary where no row has it."""
    import torch

    from mt.data import prepare_data
    from mt.train import Trainer

    with tempfile.TemporaryDirectory() as work:
        if vocab_from is not None:
            copy_vocabulary(vocab_from, Path(work))
        def row_config(row: dict):
            return load_config(config, [f"run_dir={work}", *(f"model.{k}={v}" for k, v in row.items()), *overrides])

        data = prepare_data(row_config({}).data, work)
        trainers = {name: Trainer(row_config(row), data) for name, row in settings.items()}
        first = next(iter(trainers.values()))
        micro_batches = first.micro_batches()
        updates = [first.next_update(micro_batches)[:2] for _ in range(steps + 1)]  # (batches, target tokens)
        tokens = sum(n for _, n in updates[1:])
        seconds: dict[str, list[float]] = {name: [] for name in trainers}
        for name, trainer in trainers.items():  # warm-up: first allocations, kernel choices
            for _ in range(3):
                trainer.train_step(*updates[0])
        for i in range(rounds):
            order = list(trainers) if i % 2 == 0 else list(reversed(trainers))  # no row always first
            for name in order:
                trainer = trainers[name]
                started = time.perf_counter()
                for update in updates[1:]:
                    trainer.train_step(*update)
                seconds[name].append((time.perf_counter() - started) / steps)
                print(f"speed round {i + 1}: {name} {seconds[name][-1]:.3f} s/step", file=sys.stderr, flush=True)
        return {"rounds": rounds, "steps": steps, "threads": torch.get_num_threads(),
                "seconds_per_step": {n: statistics.median(t) for n, t in seconds.items()},
                "tokens_per_s": {n: tokens / steps / statistics.median(t) for n, t in seconds.items()}}


def budget_steps(speeds: dict, name: str, minutes: float) -> int:
    """The steps row `name` trains in `minutes` of training steps at its measured speed."""
    return max(1, round(minutes * 60 / speeds["seconds_per_step"][name]))


def train_and_score(settings: dict, run_dir: Path, steps: int, args: argparse.Namespace,
                    vocab_from: Path | None) -> None:
    """`mt train` for `steps` steps, then `mt eval` of the last and the averaged checkpoint, unless the run
    has its scores already; an interrupted run resumes."""
    if (run_dir / "checkpoint_last.pt").is_file():
        trained_for = load_checkpoint(run_dir / "checkpoint_last.pt")["config"]["train"]["max_steps"]
        if trained_for != steps:
            sys.exit(f"ablation: {run_dir} trains for {trained_for} steps, the budget is now {steps}: move it away")
    if (run_dir / "scores.jsonl").is_file() and len(read_records(run_dir / "scores.jsonl")) >= 2:
        print(f"{run_dir}: already trained and scored", file=sys.stderr)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if vocab_from is not None and vocab_from != run_dir:  # the same SentencePiece model for every row, byte for byte
        copy_vocabulary(vocab_from, run_dir)
    sets = [f"run_dir={run_dir}", f"train.max_steps={steps}", "train.max_time_minutes=0",
            *(f"model.{k}={v}" for k, v in settings.items()), *args.set]
    mt = [sys.executable, "-m", "mt"]
    resume = ["--resume"] if (run_dir / "checkpoint_last.pt").is_file() else []
    run([*mt, "train", "--config", str(args.config), *resume, *(a for s in sets for a in ("--set", s))])
    cfg = load_config(args.config, sets)
    if not cfg.data.test:
        sys.exit(f"ablation: {args.config} names no data.test to score")
    for checkpoint in ("checkpoint_last.pt", "checkpoint_avg.pt"):
        run([*mt, "eval", "--checkpoint", str(run_dir / checkpoint), "--src", f"{cfg.data.test}.{cfg.data.src_lang}",
             "--ref", f"{cfg.data.test}.{cfg.data.tgt_lang}", "--output", str(run_dir / f"test.{checkpoint[:-3]}.hyp")])


def row_figures(run_dir: Path, test: str) -> dict:
    """Parameters, layers, steps, and the BLEU on `test` (the source file `mt eval` read) of the last and the
    averaged checkpoint with their signatures."""
    state = load_checkpoint(run_dir / "checkpoint_last.pt")
    spec = state["model_spec"]
    cfg = from_dict(ModelConfig, spec["cfg"], str(run_dir))
    scores = {r["checkpoint"]: r for r in read_records(run_dir / "scores.jsonl")
              if Path(r["test"]).resolve() == Path(ROOT, test).resolve()} if (run_dir / "scores.jsonl").is_file() else {}
    return {
        "parameters": count_parameters(cfg, spec["src_vocab_size"], spec["tgt_vocab_size"],
                                       spec["share_all_embeddings"]),
        "steps": state["progress"]["step"],
        "last": scores.get("checkpoint_last.pt", {}), "avg": scores.get("checkpoint_avg.pt", {}),
        "layers": cfg.n_layers if cfg.arch == "decoder_only" else f"{cfg.n_layers}+{cfg.decoder_layers}",
    }


def table(rows: list[tuple[str, str, float, Path]], test: str, speeds: dict) -> str:
    """rows: (label, row name, minutes, run directory)."""
    signatures: list[str] = []

    def bleu(score: dict) -> str:
        if not score:
            return "-"
        if score["bleu_signature"] not in signatures:
            signatures.append(score["bleu_signature"])
        return f"{score['bleu']:.2f} [{signatures.index(score['bleu_signature']) + 1}]"

    lines = ["| row | layers | parameters | tokens/s | minutes | steps | BLEU last | BLEU averaged |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, name, minutes, run_dir in rows:
        f = row_figures(run_dir, test)
        lines.append(f"| {label} | {f['layers']} | {f['parameters'] / 1e6:.2f}M | {speeds['tokens_per_s'][name]:,.0f} | "
                     f"{minutes:g} | {f['steps']:,} | {bleu(f['last'])} | {bleu(f['avg'])} |")
    lines.append("")
    lines.append(f"tokens/s: target tokens per second of training steps, measured side by side ({speeds['rounds']} "
                 f"rounds of {speeds['steps']} steps, {speeds['threads']} threads); steps: `minutes` of them.")
    lines += [f"[{i}] sacreBLEU {s}" for i, s in enumerate(signatures, start=1)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "multi30k.yaml")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation", help="one run directory per row")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--minutes", type=float, default=20.0, help="each row's budget of training steps")
    parser.add_argument("--hour", type=float, default=60.0, help="the budget of the best row's and the 2017 model's "
                        "second run (the recipe's hour, in minutes of training steps)")
    parser.add_argument("--no-hour", action="store_true", help="skip the second, longer runs")
    parser.add_argument("--hour-rows", default="paper,best", help="the rows run again for --hour, comma-separated; "
                        "`best` is the scored row with the best averaged BLEU other than the 2017 model")
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--speed-steps", type=int, default=10, help="training steps per row and round")
    parser.add_argument("--table-only", action="store_true", help="print the table of the runs already there")
    parser.add_argument("--speeds-only", action="store_true", help="learn the vocabulary and measure the speeds, "
                        "then stop (before starting two invocations at once)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an override for every row (the same for all, so the rows stay comparable)")
    args = parser.parse_args()
    args.config, args.runs = args.config.resolve(), args.runs.resolve()  # the subprocesses run in ROOT
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    hour_names = [n.strip() for n in args.hour_rows.split(",") if n.strip()]
    unknown = [n for n in names + hour_names if n not in ROWS and n != "best"]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    cfg = load_config(args.config, args.set)
    settings = plan(list(ROWS), cfg.model, cfg.data.vocab_size)
    test = f"{cfg.data.test}.{cfg.data.src_lang}"  # what each row's `mt eval --src` reads

    def run_dir(name: str, minutes: float) -> Path:
        return args.runs / f"{name}-{minutes:g}min"

    def vocab_from() -> Path | None:
        """A run directory that already holds the SentencePiece model, if any row has learned it."""
        return next((d for n in ROWS for d in (run_dir(n, args.minutes), run_dir(n, args.hour))
                     if (d / "spm.model").is_file()), None)

    speeds_path = args.runs / "speeds.json"
    measured_for = {"config": str(args.config), "set": args.set}  # the speeds hold for this recipe only
    if args.table_only:
        if not speeds_path.is_file():
            sys.exit(f"ablation: no {speeds_path} yet")
        speeds = json.loads(speeds_path.read_text(encoding="utf-8"))
    else:
        args.runs.mkdir(parents=True, exist_ok=True)
        with open(args.runs / ".lock", "w") as lock:  # two invocations at once: one learns and measures
            fcntl.flock(lock, fcntl.LOCK_EX)
            if vocab_from() is None:  # the first row learns the vocabulary, which the speeds need
                first = run_dir(names[0] if names else "paper", args.minutes)
                first.mkdir(parents=True, exist_ok=True)
                run([sys.executable, "-m", "mt", "train", "--config", str(args.config), "--prepare-only",
                     "--set", f"run_dir={first}", *(a for s in args.set for a in ("--set", s))])
            if not speeds_path.is_file():
                speeds = measure_speeds(settings, args.config, args.set, vocab_from(), args.speed_rounds,
                                        args.speed_steps) | {"measured_for": measured_for}
                partial = speeds_path.with_suffix(".partial")
                partial.write_text(json.dumps(speeds, indent=1) + "\n", encoding="utf-8")
                os.replace(partial, speeds_path)
        speeds = json.loads(speeds_path.read_text(encoding="utf-8"))
        if speeds.get("measured_for", measured_for) != measured_for:
            sys.exit(f"ablation: {speeds_path} was measured for {speeds['measured_for']}, not {measured_for}; "
                     "use another --runs")
        if args.speeds_only:
            print(json.dumps(speeds, indent=1))
            return

    if not args.table_only:
        for name in names:
            train_and_score(settings[name], run_dir(name, args.minutes), budget_steps(speeds, name, args.minutes),
                            args, vocab_from())
    # The table and the choice of the best row cover every row run so far, also those of earlier invocations.
    scored = [n for n in ROWS if (run_dir(n, args.minutes) / "scores.jsonl").is_file()]
    rows = [(ROWS[n][0], n, args.minutes, run_dir(n, args.minutes)) for n in ROWS if n in names or n in scored]
    if not args.no_hour and args.hour != args.minutes:  # (the same budget would be the same run directories)
        candidates = [(row_figures(run_dir(n, args.minutes), test)["avg"].get("bleu", -1.0), n) for n in scored
                      if n != "paper"]
        best = max(candidates)[1] if candidates else None
        chosen = [m for m in (best if n == "best" else n for n in hour_names) if m]
        # The table lists both hour rows whichever one this invocation trains.
        listed = [n for n in ["paper", best] + chosen if n]
        for name in dict.fromkeys(listed):
            if name not in chosen and not (run_dir(name, args.hour) / "scores.jsonl").is_file():
                continue
            if not args.table_only and name in chosen:
                train_and_score(settings[name], run_dir(name, args.hour), budget_steps(speeds, name, args.hour), args,
                                vocab_from())
            rows.append((f"{ROWS[name][0]}, {args.hour:g} min", name, args.hour, run_dir(name, args.hour)))
    text = table([row for row in rows if (row[3] / "scores.jsonl").is_file()], test, speeds)  # not the rows in training
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / "table.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
