"""Distributed data parallel: 2 gloo processes under torchrun = 1 process with update_freq 2, same batches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mt.checkpoint import load_checkpoint

from conftest import ROOT, write_pairs


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_update_freq_2(tmp_path):
    prefix = write_pairs(tmp_path / "pairs", 200)
    common = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--quiet",
              "--set", f"data.train={prefix}", "--set", f"data.valid={prefix}", "--set", "data.max_tokens=256",
              "--set", "model.dropout=0.0", "--set", "train.max_steps=4", "--set", "train.valid_bleu=false",
              "--set", "train.validate_every=100", "--set", "train.save_every=2", "--set", "train.average_last=0",
              "--set", "train.num_threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "mt", "train", *common, "--set", f"run_dir={tmp_path / 'one'}",
                             "--set", "train.update_freq=2"], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "mt", "train", *common,
                          "--set", f"run_dir={tmp_path / 'two'}"], capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes: global batch" in ddp.stdout
    a = load_checkpoint(tmp_path / "one" / "checkpoint_last.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoint_last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 4
    assert a["progress"]["epoch"] == 0  # both stayed inside the first epoch, where their batches coincide
    start = load_checkpoint(tmp_path / "one" / "checkpoint_2.pt")["model"]
    moved = 0.0
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], atol=2e-5, rtol=1e-4)
        moved = max(moved, (a["model"][key] - start[key]).abs().max().item())
    assert moved > 1e-4  # the weights did change between step 2 and 4: the comparison is not vacuous
    assert len(a["rng"]) == 1 and len(b["rng"]) == 2  # each rank's RNG state is kept for resuming
