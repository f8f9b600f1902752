"""The WMT14 recipe's code path, offline: the news sample through `datasets`, then base.yaml on it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import DATA, ROOT


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
