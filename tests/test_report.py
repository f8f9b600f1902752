"""mt report: RUN_DIR/report.md holds what the run's own files say, figure for figure."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import matplotlib.image

from mt.cli import main
from mt.report import write_report

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def test_report_holds_the_config_curves_dev_and_test_scores_speed_and_hardware(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint.parent, run)
    (run / "scores.jsonl").unlink(missing_ok=True)  # other tests' evaluations of the shared run
    for lang in ("de", "en"):
        lines = (MULTI30K / f"val.{lang}").read_text(encoding="utf-8").splitlines()[:8]
        (tmp_path / f"test.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["eval", "--checkpoint", str(run / "checkpoint_avg.pt"), "--src", str(tmp_path / "test.de"),
                 "--ref", str(tmp_path / "test.en"), "--quiet"]) == 0
    assert main(["report", str(run), "--quiet"]) == 0
    text = (run / "report.md").read_text(encoding="utf-8")

    assert "![learning curves](curves.png)" in text
    assert matplotlib.image.imread(run / "curves.png").ndim == 3
    assert (run / "config.yaml").read_text(encoding="utf-8").strip() in text  # the resolved config, verbatim
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "valid_loss" in r]
    assert validations
    for r in validations:
        assert (f"| {r['step']:,} | {r['valid_loss']:.3f} | {r['valid_ppl']:.2f} | {r['valid_bleu']:.2f} |"
                in text)
    (scores,) = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    assert f"| checkpoint_avg.pt | `{tmp_path / 'test.de'}` | {scores['search']}, fp32 | {scores['bleu']:.2f} | " \
           f"{scores['chrf']:.2f} |" in text
    assert f"`BLEU|{scores['bleu_signature']}`" in text and f"`chrF2|{scores['chrf_signature']}`" in text
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    assert f"- {statistics.median(speeds):,.0f} target tokens/s (median of {len(speeds)} log lines" in text
    (start,) = [r for r in records if "hardware" in r]
    mfu = statistics.median(speeds) * start["flops_per_token"] / start["peak_flops"]
    assert f"- MFU {100 * mfu:.1f}%" in text
    assert f"| 0 | {start['hardware']['name']} (cpu) | {start['hardware']['threads']} | 1 | fp32 |" in text


def test_report_of_a_run_without_hardware_or_test_scores_says_so(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    records = [{"step": 10, "loss": 7.0, "ppl": 900.0, "lr": 1e-4, "tokens_per_s": 1000.0, "elapsed_s": 60.0},
               {"step": 10, "valid_loss": 6.5, "valid_ppl": 500.0, "valid_bleu": 1.5},
               {"step": 10, "valid_loss": 6.4, "valid_ppl": 480.0, "valid_bleu": 1.7}]  # resumed: logged again
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (run / "checkpoint_10.pt").write_bytes(b"")
    text = write_report(run).read_text(encoding="utf-8")
    assert "| 10 | 6.400 | 480.00 | 1.70 |" in text and "6.500" not in text
    assert "MFU: not recorded" in text and "## Hardware\n\nNot recorded" in text
    assert "None recorded: `mt eval --checkpoint" in text and "config.yaml: not found" in text
