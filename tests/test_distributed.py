"""Distributed data parallel: 2 gloo processes under torchrun = 1 process with update_freq 2, same batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mt.checkpoint import load_checkpoint

from conftest import ROOT, write_pairs


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crashed rank prints its Python stack


def tiny_run_args(tmp_path, dropout: float, save_every: int) -> list[str]:
    """`mt train` arguments for a tiny model on 200 Multi30k pairs, 256-token batches, one thread."""
    prefix = write_pairs(tmp_path / "pairs", 200)
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--quiet"]
    for item in (f"data.train={prefix}", f"data.valid={prefix}", "data.max_tokens=256", f"model.dropout={dropout}",
                 "train.valid_bleu=false", "train.validate_every=100", f"train.save_every={save_every}",
                 "train.average_last=0", "train.num_threads=1", "train.device=cpu"):  # gloo, also beside a GPU
        args += ["--set", item]
    return args


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_update_freq_2(tmp_path):
    common = tiny_run_args(tmp_path, dropout=0.0, save_every=2) + ["--set", "train.max_steps=4",
                                                                   "--set", "train.log_every=2"]
    single = subprocess.run([sys.executable, "-m", "mt", "train", *common, "--set", f"run_dir={tmp_path / 'one'}",
                             "--set", "train.update_freq=2"], capture_output=True, text=True, env=ENV)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "mt", "train", *common,
                          "--set", f"run_dir={tmp_path / 'two'}"], capture_output=True, text=True, env=ENV)
    assert ddp.returncode == 0, ddp.stdout[-1000:] + ddp.stderr[-3000:]
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
    # The logged training loss is both ranks' (per target token of both), not rank 0's half.
    logged = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for run in ("one", "two")]
    assert [r["step"] for r in logged[0]] == [r["step"] for r in logged[1]] == [2, 4]
    for single, ddp in zip(*logged):
        assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-4)
        assert ddp["nll"] == pytest.approx(single["nll"], rel=1e-4)


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    common = tiny_run_args(tmp_path, dropout=0.1, save_every=3)

    def torchrun(run: str, steps: int, *extra: str) -> None:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", "29534", "-m", "mt", "train", *common, "--set", f"run_dir={tmp_path / run}",
                            "--set", f"train.max_steps={steps}", *extra], capture_output=True, text=True, env=ENV)
        assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-3000:]

    torchrun("straight", 6)
    torchrun("resumed", 3)
    torchrun("resumed", 6, "--resume")
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint_last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 6
    for key in a["model"]:  # dropout is on: equal weights need each rank's RNG state restored
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    common = tiny_run_args(tmp_path, dropout=0.1, save_every=1000) + [
        "--set", "train.max_steps=100000", "--set", "train.log_every=1", "--set", f"run_dir={tmp_path / 'run'}"]
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", "29535", "-m", "mt", "train", *common],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGUSR1)  # one rank only: the other learns it from the collective
    _, err = torchrun.communicate(timeout=120)
    assert "exitcode  : 75" in err or torchrun.returncode == 75, err[-3000:]
    state = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    step = state["progress"]["step"]
    assert step % 10 == 0 and len(state["rng"]) == 2  # the ranks agreed at a PREEMPTION_CHECK_EVERY step
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged[-1] == step  # no rank trained a step the checkpoint does not hold
