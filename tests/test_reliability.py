"""What a training run survives: SIGKILL at random moments (time budget included), SIGTERM, a failed checkpoint
write, non-finite losses, a truncated checkpoint, another process count on resume, and the loop's edge cases
(the last step validated, a max_epochs stop's data position)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mt.checkpoint
import mt.train
from mt.checkpoint import load_checkpoint
from mt.cli import EXIT_PREEMPTED, main
from mt.config import load_config
from mt.data import prepare_data
from mt.errors import MTError
from mt.metrics import Clock
from mt.checkpoint import remap_data_position
from mt.train import Trainer

from conftest import ROOT, write_pairs

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _config(run_dir: Path, corpus: Path, *extra: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={run_dir}", f"data.train={corpus}", f"data.valid={corpus}", "data.max_tokens=256",
        "train.valid_bleu=false", "train.num_threads=1", *extra])


def _trainer(cfg, resume: bool = False) -> Trainer:
    return Trainer(cfg, prepare_data(cfg.data, cfg.run_dir), resume=resume)


def _cli_args(run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    args = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--quiet"]
    for item in (f"run_dir={run_dir}", f"data.train={corpus}", f"data.valid={corpus}", "data.max_tokens=256",
                 "train.valid_bleu=false", "train.num_threads=1", "model.dropout=0.1", "train.average_last=0",
                 *extra):
        args += ["--set", item]
    return args


def _same_training_state(a: dict, b: dict) -> None:
    assert a["progress"]["step"] == b["progress"]["step"]
    assert (a["progress"]["epoch"], a["progress"]["batch"]) == (b["progress"]["epoch"], b["progress"]["batch"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for (i, x), (j, y) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert i == j and all(torch.equal(x[k], y[k]) for k in x), i


@pytest.mark.slow
def test_ten_sigkills_at_random_moments_under_a_time_budget_end_as_an_uninterrupted_run(tmp_path):
    corpus = write_pairs(tmp_path / "pairs", 120)
    # 30 s of training, which becomes a step budget after 5 steps; warmup 20 and a linear decay.
    budget = ["train.max_time_minutes=0.5", "train.max_steps=100000", "train.budget_calibration_steps=5",
              "train.lr_schedule=linear",
              "train.warmup_steps=20", "train.save_every=3", "train.validate_every=1000", "train.log_every=1000"]
    killed = _cli_args(tmp_path / "killed", corpus, *budget)
    assert main(killed + ["--prepare-only"]) == 0  # the vocabulary and cache, once
    rng, kills = random.Random(0), 0
    command = [sys.executable, "-m", "mt", *killed]
    while True:
        resume = ["--resume"] if (tmp_path / "killed" / "checkpoint_last.pt").exists() else []
        process = subprocess.Popen(command + resume, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:  # ~2-3 s of Python and torch start-up, then a random moment of training or saving
            _, err = process.communicate(timeout=rng.uniform(3.0, 5.0) if kills < 10 else 300)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.communicate()
            kills += 1
            continue
        assert process.returncode == 0, err.decode()[-2000:]
        break
    assert kills >= 10
    state = load_checkpoint(tmp_path / "killed" / "checkpoint_last.pt")
    steps = state["progress"]["step_budget"]
    assert steps and state["progress"]["step"] == steps > 5
    # The same run as a step budget, never interrupted, never looking at a clock.
    straight = _cli_args(tmp_path / "straight", corpus, *budget[2:], "train.max_time_minutes=0",
                         f"train.max_steps={steps}")
    assert subprocess.run([sys.executable, "-m", "mt", *straight], env=ENV, capture_output=True).returncode == 0
    _same_training_state(state, load_checkpoint(tmp_path / "straight" / "checkpoint_last.pt"))


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_exits_75_and_resume_loses_no_step(tmp_path):
    corpus = write_pairs(tmp_path / "pairs", 120)
    common = ["train.max_steps=400", "train.save_every=1000", "train.validate_every=1000", "train.log_every=1"]
    args = _cli_args(tmp_path / "stopped", corpus, *common)
    assert main(args + ["--prepare-only"]) == 0
    process = subprocess.Popen([sys.executable, "-m", "mt", *args], env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "preempted by SIGTERM" in out and "--resume" in out
    trained = [json.loads(line)["step"] for line in metrics.read_text().splitlines()][-1]
    state = load_checkpoint(tmp_path / "stopped" / "checkpoint_last.pt")
    assert state["progress"]["step"] == trained < 400  # every step it trained is in the checkpoint
    assert not (tmp_path / "stopped" / "checkpoint_avg.pt").exists()  # averaging waits for the real end
    assert not list((tmp_path / "stopped").glob("checkpoint_[0-9]*.pt"))  # none off the save_every grid
    # Resumed to step trained + 3, it equals a run of trained + 3 steps that was never stopped.
    more = [f"train.max_steps={trained + 3}"]
    assert main(args + ["--set", more[0], "--resume"]) == 0
    assert main(_cli_args(tmp_path / "straight", corpus, *common, *more)) == 0
    _same_training_state(load_checkpoint(tmp_path / "stopped" / "checkpoint_last.pt"),
                         load_checkpoint(tmp_path / "straight" / "checkpoint_last.pt"))


def test_a_write_that_fails_mid_save_leaves_the_previous_checkpoints_loadable(tmp_path, monkeypatch):
    corpus = write_pairs(tmp_path / "pairs", 60)
    cfg = _config(tmp_path / "run", corpus, "train.max_steps=6", "train.save_every=2", "train.validate_every=100")
    trainer = _trainer(cfg)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if trainer.progress.step >= 4:
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(mt.checkpoint.torch, "save", disk_full)
    with pytest.raises(MTError) as error:
        trainer.fit()
    message = str(error.value)
    assert "checkpoint_4.pt" in message and "No space left on device" in message and "MiB free" in message
    assert "\n" not in message
    run = Path(cfg.run_dir)
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".pt") == ["checkpoint_2.pt", "checkpoint_last.pt"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no half-written file left behind
    assert load_checkpoint(run / "checkpoint_last.pt")["progress"]["step"] == 2


def test_nonfinite_losses_skip_their_updates_then_stop_the_run_after_nonfinite_limit(tmp_path, monkeypatch):
    corpus = write_pairs(tmp_path / "pairs", 60)
    cfg = _config(tmp_path / "run", corpus, "train.max_steps=20", "train.save_every=2", "train.log_every=1",
                  "train.validate_every=100", "train.nonfinite_limit=3")
    trainer = _trainer(cfg)
    real_loss = mt.train.label_smoothed_loss

    def poisoned(*args, **kwargs):  # from step 5 on, the loss is NaN
        loss, nll = real_loss(*args, **kwargs)
        return (loss * float("nan"), nll) if trainer.progress.step >= 4 else (loss, nll)

    monkeypatch.setattr(mt.train, "label_smoothed_loss", poisoned)
    weights = {}
    real_step = Trainer.train_step

    def remember(self, *args):
        weights[self.progress.step] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return real_step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", remember)
    with pytest.raises(MTError, match=r"3 updates in a row had a non-finite loss or gradient \(train.nonfinite_limit"):
        trainer.fit()
    assert trainer.progress.step == 7  # steps 5, 6, 7 skipped, the third one stops the run
    for key, before in weights[4].items():  # the skipped updates left every weight as it was
        assert torch.equal(trainer.model.state_dict()[key], before), key
    assert not torch.equal(weights[4]["output.weight"], weights[3]["output.weight"])  # step 4 did learn
    assert all(int(s["step"]) == 4 for s in trainer.optimizer.state.values())  # Adam's own count too
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in records if "loss" in r] == [0, 0, 0, 0, 1, 1, 1]


def test_a_truncated_checkpoint_last_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog):
    corpus = write_pairs(tmp_path / "pairs", 60)
    cfg = _config(tmp_path / "run", corpus, "train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=3",
                  "train.validate_every=100", "train.average_last=0")
    _trainer(cfg).fit()
    run = Path(cfg.run_dir)
    data = (run / "checkpoint_last.pt").read_bytes()
    with open(run / "checkpoint_last.pt", "r+b") as f:  # in place: the hard-linked checkpoint_6.pt too
        f.truncate(len(data) // 3)
    with caplog.at_level("WARNING"):
        trainer = _trainer(cfg, resume=True)
    assert trainer.progress.step == 4
    assert any("checkpoint_last.pt: not a readable mt checkpoint" in r.getMessage() and "checkpoint_4.pt" in
               r.getMessage() for r in caplog.records)


def test_a_resume_under_another_process_count_is_remapped_or_refused(tmp_path, caplog):
    # Batch 3 of epoch 1 in groups of 2: 6 batches of the epoch done.
    assert remap_data_position(Path("c.pt"), 1, 3, 2, 1) == 6
    assert remap_data_position(Path("c.pt"), 1, 3, 2, 3) == 2
    with pytest.raises(MTError, match=r"c.pt was saved by 2 processes after 6 batches of epoch 1, which 4 "):
        remap_data_position(Path("c.pt"), 1, 3, 2, 4)
    # Through the trainer: a checkpoint of 2 processes (two RNG states) resumed by this one.
    corpus = write_pairs(tmp_path / "pairs", 120)
    cfg = _config(tmp_path / "run", corpus, "train.max_steps=3", "train.save_every=3", "train.validate_every=100",
                  "train.average_last=0")
    _trainer(cfg).fit()
    path = Path(cfg.run_dir) / "checkpoint_last.pt"
    state = load_checkpoint(path)
    state["rng"] = state["rng"] * 2
    mt.checkpoint.save_checkpoint(path, {k: v for k, v in state.items() if k != "format"})
    with caplog.at_level("WARNING"):
        trainer = _trainer(cfg, resume=True)
    assert (trainer.progress.epoch, trainer.progress.batch) == (0, 6)
    assert any("saved by 2 processes, resuming with 1: batch 3 of epoch 0 is now position 6" in r.getMessage()
               for r in caplog.records)


def test_the_last_step_is_validated_when_max_steps_is_not_a_multiple_of_validate_every(tmp_path):
    corpus = write_pairs(tmp_path / "pairs", 60)
    cfg = _config(tmp_path / "run", corpus, "train.max_steps=5", "train.validate_every=3", "train.average_last=0")
    result = _trainer(cfg).fit()
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid_loss" in r] == [3, 5]
    assert result.last_valid["valid_loss"] == records[-1]["valid_loss"]
    assert load_checkpoint(Path(cfg.run_dir) / "checkpoint_best.pt")["progress"]["step"] in (3, 5)


def test_a_max_epochs_stop_keeps_the_data_position_it_trained_and_resumes_exactly(tmp_path):
    corpus = write_pairs(tmp_path / "pairs", 60)
    common = ["model.dropout=0.1", "train.save_every=1000", "train.validate_every=1000", "train.average_last=0"]
    one = _config(tmp_path / "a", corpus, "train.max_epochs=1", *common)
    result = _trainer(one).fit()
    batches_per_epoch = result.progress.step
    saved = load_checkpoint(Path(one.run_dir) / "checkpoint_last.pt")["progress"]
    assert (saved["epoch"], saved["batch"]) == (0, batches_per_epoch) and result.stop_reason == "max_epochs 1"
    records = [json.loads(line) for line in (Path(one.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid_loss" in r] == [batches_per_epoch]  # the last step, once
    _trainer(_config(tmp_path / "a", corpus, "train.max_epochs=2", *common), resume=True).fit()
    _trainer(_config(tmp_path / "b", corpus, "train.max_epochs=2", *common)).fit()
    a = load_checkpoint(Path(one.run_dir) / "checkpoint_last.pt")
    _same_training_state(a, load_checkpoint(tmp_path / "b" / "checkpoint_last.pt"))
    assert a["progress"]["step"] == 2 * batches_per_epoch


def test_a_time_budget_counts_validations_and_checkpoints_when_it_becomes_steps():
    clock = Clock()
    for _ in range(10):
        clock.step(1.0)
    clock.validation(50.0)
    clock.save(2.0)
    # Each step costs 1 s, plus 50 s every 100 steps and 2 s every 10: 1.7 s; 170 s are 100 more steps.
    assert clock.steps_that_fit(10, 170.0, validate_every=100, save_every=10) == 110
    assert Clock(steps=10, step_seconds=10.0).steps_that_fit(10, 170.0, 100, 10) == 180  # nothing else timed yet


def test_resuming_with_another_model_names_the_key_that_differs(tmp_path):
    corpus = write_pairs(tmp_path / "pairs", 60)
    cfg = _config(tmp_path / "run", corpus, "train.max_steps=2", "train.validate_every=100", "train.average_last=0")
    _trainer(cfg).fit()
    other = _config(tmp_path / "run", corpus, "train.max_steps=4", "model.d_ff=128", "model.embed_init=normal")
    with pytest.raises(MTError, match=r"checkpoint_last.pt: the checkpoint's model.d_ff \(64\) differs from the "
                                      r"config's; resume with the config the run started with"):
        _trainer(other, resume=True)
    # embed_init shapes only the first step's weights: a resume may name another one.
    same = _config(tmp_path / "run", corpus, "train.max_steps=4", "model.embed_init=normal")
    assert _trainer(same, resume=True).progress.step == 2
