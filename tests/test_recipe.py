"""The WMT14 recipe's code path, offline: the news sample through `datasets`, then base.yaml on it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mt.checkpoint import load_checkpoint
from mt.metrics import read_records

from conftest import DATA, ROOT, write_pairs


def test_wmt14_recipe_runs_on_the_local_news_sample(tmp_path):
    pytest.importorskip("datasets")  # prepare_wmt14.py and the `hf:` training data read through it
    out = tmp_path / "wmt14"
    prep = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_wmt14.py"), "--sample",
                           str(DATA / "wmt-sample"), "--out", str(out)], capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    assert "10000 pairs" in prep.stdout
    train = subprocess.run(
        [sys.executable, "-m", "mt", "train", "--config", str(ROOT / "configs" / "base.yaml"), "--prepare-only",
         "--set", f"run_dir={tmp_path / 'run'}", "--set", f"data.train=hf:{out / 'train.jsonl'}",
         "--set", f"data.valid={out / 'newstest2013'}", "--set", "data.vocab_size=2000"],
        capture_output=True, text=True)
    assert train.returncode == 0, train.stderr
    assert "vocabulary: 2000 pieces (joint)" in train.stdout
    # The sample's long news sentences meet the paper's 250-token filter and the 9x length-ratio filter.
    pairs = int(train.stdout.split("train: ")[1].split(" pairs")[0])
    assert 9000 < pairs <= 10000
    assert "real tokens" in train.stdout


def test_the_ablation_script_budgets_rows_by_measured_speed_and_runs_the_hour_for_the_best(tmp_path):
    """scripts/ablation.py end to end on the tiny model: speeds for every row, step budgets from them, two rows
    trained and scored, the hour run of the best one, and the table."""
    pairs = write_pairs(tmp_path / "pairs", 100)
    runs = tmp_path / "runs"
    command = [sys.executable, str(ROOT / "scripts" / "ablation.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
               "--runs", str(runs), "--rows", "paper,rope", "--minutes", "0.01", "--hour", "0.02",
               "--hour-rows", "best", "--speed-rounds", "1", "--speed-steps", "2",
               *(a for key in ("train", "valid", "test") for a in ("--set", f"data.{key}={pairs}"))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    speeds = json.loads((runs / "speeds.json").read_text())
    assert set(speeds["seconds_per_step"]) == {"paper", "pre_norm", "rmsnorm", "swiglu", "rope", "all_three",
                                               "decoder_only"}
    for row, minutes in (("paper", 0.01), ("rope", 0.01)):
        run_dir = runs / f"{row}-{minutes:g}min"
        budget = max(1, round(minutes * 60 / speeds["seconds_per_step"][row]))
        assert load_checkpoint(run_dir / "checkpoint_last.pt")["config"]["train"]["max_steps"] == budget
        checkpoints = {r["checkpoint"] for r in read_records(run_dir / "scores.jsonl")}
        assert checkpoints == {"checkpoint_last.pt", "checkpoint_avg.pt"}
    # --hour-rows best: the best scored row other than the 2017 model, so rope, and not the 2017 model's hour
    assert (runs / "rope-0.02min" / "scores.jsonl").is_file() and not (runs / "paper-0.02min").exists()
    table = (runs / "table.md").read_text()
    assert table.count("| RoPE") == 2 and "| 2017 model" in table and "nrefs:1|case:mixed" in table

    # Speeds that give a trained row another budget: the row is refused, not silently reused.
    speeds["seconds_per_step"]["rope"] /= 3
    (runs / "speeds.json").write_text(json.dumps(speeds))
    again = subprocess.run([*command[:command.index("--rows") + 1], "rope", *command[command.index("--rows") + 2:],
                            "--no-hour"], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode != 0 and "move it away" in again.stderr.splitlines()[-1]
