"""The run report: RUN_DIR/report.md, one page that says what a run was and how it went.

It holds the learning curves (RUN_DIR/curves.png, drawn by mt.plot), the dev scores of every validation, the
test scores `mt eval --checkpoint` recorded (RUN_DIR/scores.jsonl, with sacreBLEU's signatures), the speed
(tokens/s and MFU), the hardware of each start of `mt train`, and the resolved config (RUN_DIR/config.yaml).
"""

from __future__ import annotations

import datetime
import statistics
from pathlib import Path
from typing import Any

from mt.errors import MTError
from mt.io import atomic_write_text
from mt.metrics import read_records
from mt.plot import latest_records, learning_curves, run_records, save_figure

MAX_DEV_ROWS = 20  # a long run's validations, thinned to this many rows (the last one always kept)
CURVES = "curves.png"


def write_report(run_dir: str | Path, command: str = "") -> Path:
    """Draw RUN_DIR/curves.png and write RUN_DIR/report.md; returns the report's path."""
    run_dir = Path(run_dir)
    records = run_records(run_dir)  # one line where metrics.jsonl is missing, empty or unreadable
    if not any(run_dir.glob("checkpoint_*.pt")):
        raise MTError(f"{run_dir}: no checkpoints (checkpoint_*.pt): mt train has not saved this run yet")
    save_figure(learning_curves([run_dir]), run_dir / CURVES)
    path = run_dir / "report.md"
    try:
        atomic_write_text(path, report_text(run_dir, records, command or f"mt report {run_dir}"))
    except OSError as e:
        raise MTError(f"{path}: cannot write the report ({e.strerror or e})") from None
    return path


def report_text(run_dir: Path, records: list[dict[str, Any]], command: str) -> str:
    train, valid = latest_records(records)
    starts = [r for r in records if isinstance(r.get("hardware"), dict)]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Run report: {run_dir.resolve().name}", "", f"Written by `{command}` on {now}.", ""]
    if train:
        # The last validation may come after the last log line (a run's final step), so take the latest of both.
        steps = max(r["step"] for r in train + valid)
        hours = max(r.get("elapsed_s", 0.0) for r in train + valid) / 3600
        lines += [f"{steps:,} steps, {hours:.2f} hours of training (validation and checkpoints included), "
                  f"epoch {train[-1].get('epoch', '?')} at the last log line.", ""]
    lines += ["## Learning curves", "", f"![learning curves]({CURVES})", ""]
    lines += dev_section(valid) + test_section(run_dir) + speed_section(train, starts)
    lines += hardware_section(starts) + config_section(run_dir)
    return "\n".join(lines)


def dev_section(valid: list[dict[str, Any]]) -> list[str]:
    lines = ["## Dev scores", ""]
    if not valid:
        return lines + ["No validation was logged.", ""]
    rows = valid
    if len(rows) > MAX_DEV_ROWS:
        every = -(-len(rows) // MAX_DEV_ROWS)
        rows = rows[::every] + ([rows[-1]] if (len(rows) - 1) % every else [])
    best = max(valid, key=lambda r: r.get("valid_bleu", float("-inf")))
    lines += ["| step | loss | perplexity | BLEU (greedy) |", "| --- | --- | --- | --- |"]
    for r in rows:
        bleu = f"{r['valid_bleu']:.2f}" if "valid_bleu" in r else "-"
        lines.append(f"| {r['step']:,} | {r['valid_loss']:.3f} | {r.get('valid_ppl', float('nan')):.2f} | {bleu} |")
    if "valid_bleu" in best:
        lines += ["", f"Best dev BLEU {best['valid_bleu']:.2f} at step {best['step']:,}."]
    return lines + [""]


def test_section(run_dir: Path) -> list[str]:
    """The latest score of each (checkpoint, test set, search, precision) `mt eval --checkpoint` recorded."""
    lines = ["## Test scores (sacreBLEU)", ""]
    fields = ("checkpoint", "test", "bleu", "chrf", "bleu_signature", "chrf_signature")
    latest = {(r["checkpoint"], r["test"], r.get("search"), r.get("precision")): r
              for r in read_records(run_dir / "scores.jsonl") if all(k in r for k in fields)}
    if not latest:
        return lines + [f"None recorded: `mt eval --checkpoint {run_dir}/checkpoint_avg.pt --src SRC --ref REF` "
                        "records them here.", ""]
    lines += ["| checkpoint | test set | search | BLEU | chrF2 |", "| --- | --- | --- | --- | --- |"]
    for r in latest.values():
        search = r.get("search", "") + (f", {r['precision']}" if r.get("precision") else "")
        lines.append(f"| {r['checkpoint']} | `{r['test']}` | {search} | {r['bleu']:.2f} | {r['chrf']:.2f} |")
    signatures = {(r["bleu_signature"], r["chrf_signature"]) for r in latest.values()}
    lines += ["", "Signatures:", ""]
    for bleu, chrf in sorted(signatures):
        lines += [f"- `BLEU|{bleu}`", f"- `chrF2|{chrf}`"]
    return lines + [""]


def speed_section(train: list[dict[str, Any]], starts: list[dict[str, Any]]) -> list[str]:
    """Target tokens/s of all processes (median over log lines: the first ones include warm-up) and MFU:
    model FLOPs per second over the matmul peak `mt train` measured on each process's device."""
    lines = ["## Speed", ""]
    speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    if not speeds:
        return lines + ["No training step was logged.", ""]
    tokens_per_s = statistics.median(speeds)
    lines.append(f"- {tokens_per_s:,.0f} target tokens/s (median of {len(speeds)} log lines; "
                 f"{min(speeds):,.0f} to {max(speeds):,.0f})")
    if starts and "flops_per_token" in starts[-1] and starts[-1].get("peak_flops"):
        start = starts[-1]
        processes = start["hardware"].get("processes", 1)
        achieved = tokens_per_s * start["flops_per_token"]
        mfu = achieved / (start["peak_flops"] * processes)
        lines.append(f"- MFU {100 * mfu:.1f}%: {achieved / 1e9:,.1f} model GFLOP/s "
                     f"({start['flops_per_token'] / 1e6:.2f} MFLOP per target token, forward + backward) of a "
                     f"{start['peak_flops'] / 1e9:,.0f} GFLOP/s {start.get('precision', '')} matmul peak measured at "
                     "the start of training" + (f", x {processes} processes" if processes > 1 else ""))
    else:
        lines.append("- MFU: not recorded (the run predates mt train's hardware record)")
    return lines + [""]


def hardware_section(starts: list[dict[str, Any]]) -> list[str]:
    lines = ["## Hardware", ""]
    if not starts:
        return lines + ["Not recorded (the run predates mt train's hardware record).", ""]
    lines += ["| from step | device | threads | processes | precision | torch |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in starts:
        h = r["hardware"]
        lines.append(f"| {r['step']:,} | {h.get('name', '?')} ({h.get('device', '?')}) | {h.get('threads', '?')} | "
                     f"{h.get('processes', 1)} | {r.get('precision', '?')} | {h.get('torch', '?')} |")
    return lines + [""]


def config_section(run_dir: Path) -> list[str]:
    path = run_dir / "config.yaml"
    try:
        text = path.read_text(encoding="utf-8").rstrip("\n")
    except (OSError, UnicodeDecodeError):
        return ["## Config", "", f"{path}: not found.", ""]
    return ["## Config", "", "The resolved config (`config.yaml`: every key, defaults included):", "", "```yaml",
            text, "```", ""]
