"""Training: the schedule, overfitting a tiny corpus, kill-and-resume, checkpoints."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mt.checkpoint import average_checkpoints, load_checkpoint, load_for_inference, step_checkpoints
from mt.config import TrainConfig, load_config
from mt.data import prepare_data
from mt.errors import MTError
import mt.runtime
from mt import train as train_module
from mt.optim import learning_rate
from mt.train import Trainer

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def test_schedule_follows_equation_3_of_the_paper():
    cfg = TrainConfig(warmup_steps=4000)
    d = 512
    assert learning_rate(1, cfg, d) == pytest.approx(d ** -0.5 * 4000 ** -1.5)
    assert learning_rate(4000, cfg, d) == pytest.approx(d ** -0.5 * 4000 ** -0.5)  # the peak: 6.99e-4
    assert learning_rate(4000, cfg, d) == pytest.approx(6.988e-4, rel=1e-3)
    assert learning_rate(16000, cfg, d) == pytest.approx(learning_rate(4000, cfg, d) / 2)
    assert learning_rate(2000, cfg, d) == pytest.approx(learning_rate(4000, cfg, d) / 2)
    scaled = TrainConfig(warmup_steps=4000, lr_scale=2.0)
    assert learning_rate(100, scaled, d) == pytest.approx(2 * learning_rate(100, cfg, d))


def test_peak_lr_form_peaks_at_warmup_with_the_given_value():
    cfg = TrainConfig(warmup_steps=100, peak_lr=1e-3)
    values = [learning_rate(s, cfg, 512) for s in range(1, 1000)]
    assert max(values) == pytest.approx(1e-3)
    assert values.index(max(values)) + 1 == 100
    assert learning_rate(400, cfg, 512) == pytest.approx(5e-4)


def test_linear_schedule_warms_up_then_falls_straight_to_zero_at_the_end_of_the_budget():
    cfg = TrainConfig(warmup_steps=100, peak_lr=1e-3, lr_schedule="linear")
    assert learning_rate(50, cfg, 512) == pytest.approx(5e-4)  # warming up
    assert learning_rate(100, cfg, 512, done=0.0) == pytest.approx(1e-3)
    assert learning_rate(100, cfg, 512, done=0.25) == pytest.approx(7.5e-4)  # warmup capped by the decay line
    assert learning_rate(900, cfg, 512, done=0.75) == pytest.approx(2.5e-4)
    assert learning_rate(900, cfg, 512, done=1.0) == 0.0
    assert learning_rate(900, cfg, 512, done=1.2) == 0.0  # a step past the budget never goes negative
    # Without peak_lr, the peak is that of Equation 3.
    paper = TrainConfig(warmup_steps=4000, lr_schedule="linear")
    assert learning_rate(4000, paper, 512) == pytest.approx(learning_rate(4000, TrainConfig(warmup_steps=4000), 512))


def _tiny_config(tmp_path: Path, corpus: Path, *extra: str):
    return load_config("configs/tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.train={corpus}", f"data.valid={corpus}", *extra])


def _write_corpus(path: Path, n: int = 50) -> Path:
    de = (MULTI30K / "val.de").read_text(encoding="utf-8").splitlines()[:n]
    en = (MULTI30K / "val.en").read_text(encoding="utf-8").splitlines()[:n]
    path.with_suffix(".de").write_text("\n".join(de) + "\n", encoding="utf-8")
    path.with_suffix(".en").write_text("\n".join(en) + "\n", encoding="utf-8")
    return path


def test_tiny_model_overfits_50_pairs(tmp_path):
    corpus = _write_corpus(tmp_path / "pairs")
    cfg = _tiny_config(tmp_path, corpus, "model.d_model=64", "model.d_ff=128", "train.max_steps=300",
                       "train.validate_every=300", "train.save_every=300", "train.label_smoothing=0.0",
                       "train.peak_lr=3e-3", "train.warmup_steps=30", "data.vocab_size=300",
                       "data.max_tokens=4096", "train.log_every=50")
    data = prepare_data(cfg.data, cfg.run_dir)
    result = Trainer(cfg, data).fit()
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[0] > 4.0 and train_losses[-1] < 0.2, train_losses
    # Memorised: greedy decoding of the training sources reproduces the references.
    assert result.last_valid["valid_bleu"] > 90, result.last_valid
    assert result.last_valid["valid_ppl"] < 1.4


def test_linear_schedule_reaches_the_optimiser_from_steps_and_from_the_time_budgets_steps(tmp_path, caplog,
                                                                                       monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, even under `pytest -s`
    corpus = _write_corpus(tmp_path / "pairs", n=40)
    cfg = _tiny_config(tmp_path, corpus, "train.lr_schedule=linear", "train.max_steps=20", "train.warmup_steps=4",
                       "train.log_every=1", "train.valid_bleu=false", "train.average_last=0",
                       "data.max_tokens=256")
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.run_dir))
    with caplog.at_level("INFO", logger="mt.train"):
        trainer.fit()
    lrs = [r["lr"] for r in map(json.loads, (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines())
           if "lr" in r]
    expected = [1e-3 * min(s / 4, 1 - (s - 1) / 20) for s in range(1, 21)]
    assert lrs == pytest.approx(expected)  # the last step still learns: 1/20 of the peak
    # No terminal, so no progress bar: each log step is a line of the log instead.
    lines = [r.getMessage() for r in caplog.records if " tokens/s, ETA " in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == [f"step {s}/20" for s in range(1, 21)]
    assert f"lr {expected[-1]:.2e}," in lines[-1]
    # A wall-time budget, once it is a step budget, ends the line there, whatever max_steps says.
    batch = next(trainer.micro_batches())[0]
    trainer.progress.step, trainer.progress.step_budget = 5, 10
    trainer.train_step([batch], batch.n_tgt_tokens)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)


def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    corpus = _write_corpus(tmp_path / "pairs", n=40)
    common = ["model.dropout=0.1", "train.validate_every=6", "train.save_every=3", "data.max_tokens=256",
              "train.valid_bleu=false", "train.average_last=0"]
    straight = _tiny_config(tmp_path / "a", corpus, "train.max_steps=12", *common)
    Trainer(straight, prepare_data(straight.data, straight.run_dir)).fit()

    interrupted = _tiny_config(tmp_path / "b", corpus, "train.max_steps=7", *common)  # stops mid-epoch
    Trainer(interrupted, prepare_data(interrupted.data, interrupted.run_dir)).fit()
    resumed = _tiny_config(tmp_path / "b", corpus, "train.max_steps=12", *common)
    Trainer(resumed, prepare_data(resumed.data, resumed.run_dir), resume=True).fit()

    a = load_checkpoint(Path(straight.run_dir) / "checkpoint_last.pt")
    b = load_checkpoint(Path(resumed.run_dir) / "checkpoint_last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 12
    assert a["progress"]["epoch"] == b["progress"]["epoch"] >= 1  # the runs crossed an epoch boundary
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_checkpoints_load_safely_and_rebuild_the_model_alone(tmp_path):
    corpus = _write_corpus(tmp_path / "pairs")
    cfg = _tiny_config(tmp_path, corpus, "train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=2",
                       "train.validate_every=3", "train.average_last=2")
    result = Trainer(cfg, prepare_data(cfg.data, cfg.run_dir)).fit()
    run = Path(cfg.run_dir)
    assert [p.name for p in step_checkpoints(run)] == ["checkpoint_4.pt", "checkpoint_6.pt"]  # kept the last 2
    assert result.averaged == run / "checkpoint_avg.pt"
    model, vocab, loaded = load_for_inference(run / "checkpoint_avg.pt")
    a, b = (load_checkpoint(p)["model"] for p in step_checkpoints(run))
    key = next(k for k in a if a[k].is_floating_point())
    torch.testing.assert_close(model.state_dict()[key], (a[key] + b[key]) / 2)
    assert loaded.model.d_model == cfg.model.d_model and vocab.tgt_size > 8
    assert not list(run.glob(".*.tmp")), "temporary files left behind"


def test_average_rejects_checkpoints_of_different_models(tmp_path):
    corpus = _write_corpus(tmp_path / "pairs")
    paths = []
    for name, d in (("x", 32), ("y", 48)):
        cfg = _tiny_config(tmp_path / name, corpus, "train.max_steps=1", f"model.d_model={d}",
                           "train.average_last=0", "train.valid_bleu=false")
        Trainer(cfg, prepare_data(cfg.data, cfg.run_dir)).fit()
        paths.append(Path(cfg.run_dir) / "checkpoint_last.pt")
    with pytest.raises(MTError, match="different model"):
        average_checkpoints(paths, tmp_path / "avg.pt")


def test_resume_without_a_checkpoint_is_a_one_line_error(tmp_path):
    corpus = _write_corpus(tmp_path / "pairs")
    cfg = _tiny_config(tmp_path, corpus)
    with pytest.raises(MTError, match="no checkpoint to resume"):
        Trainer(cfg, prepare_data(cfg.data, cfg.run_dir), resume=True)


def test_validation_reports_loss_perplexity_and_bleu(tmp_path):
    corpus = _write_corpus(tmp_path / "pairs")
    cfg = _tiny_config(tmp_path, corpus, "train.max_steps=2", "train.validate_every=2", "train.average_last=0")
    result = Trainer(cfg, prepare_data(cfg.data, cfg.run_dir)).fit()
    v = result.last_valid
    assert v["valid_ppl"] == pytest.approx(math.exp(v["valid_nll"]))
    assert 0.0 <= v["valid_bleu"] <= 100.0
    assert v["valid_nll"] > 0.0


def test_tokens_per_second_leave_out_the_time_spent_validating(tmp_path, monkeypatch):
    # A clock that moves 1 s per training step and 100 s per validation or checkpoint: throughput must be
    # tokens per training second, whatever the validations and checkpoints cost.
    clock = {"now": 0.0}
    monkeypatch.setattr(train_module.time, "time", lambda: clock["now"])
    real_step, real_validate = Trainer.train_step, train_module.validate

    def step(self, *args):
        clock["now"] += 1.0
        return real_step(self, *args)

    def validate(*args):
        clock["now"] += 100.0
        return real_validate(*args)

    def save(self, *args, **kwargs):
        clock["now"] += 100.0
        return real_save(self, *args, **kwargs)

    real_save = Trainer.save
    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(train_module, "validate", validate)
    monkeypatch.setattr(Trainer, "save", save)
    corpus = _write_corpus(tmp_path / "pairs")
    cfg = _tiny_config(tmp_path, corpus, "train.max_steps=8", "train.validate_every=2", "train.log_every=4",
                       "train.valid_bleu=false", "train.average_last=0", "train.save_every=3")
    Trainer(cfg, prepare_data(cfg.data, cfg.run_dir)).fit()
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "tokens_per_s" in r]
    assert [r["step"] for r in logged] == [4, 8]
    for r in logged:  # 4 steps of 1 s each: the interval's tokens / 4 s, not / 204 s or more
        assert r["tokens_per_s"] > 50, logged
    # The wall-time budget still counts them: validations at steps 2, 4, 6 and a checkpoint at 3 and 6.
    assert logged[-1]["elapsed_s"] >= 8 + 500


@pytest.mark.parametrize("native", [True, False])
def test_trainer_with_auto_precision_trains_in_what_it_resolved(tmp_path, monkeypatch, native):
    monkeypatch.setattr(mt.runtime, "native_bf16", lambda device: native)
    used = []
    real_autocast = train_module.autocast
    monkeypatch.setattr(train_module, "autocast", lambda p, d: used.append(p) or real_autocast(p, d))
    corpus = _write_corpus(tmp_path / "pairs")
    cfg = _tiny_config(tmp_path, corpus, "train.precision=auto", "train.max_steps=2", "train.validate_every=2",
                       "train.valid_bleu=false", "train.average_last=0")
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.run_dir))
    trainer.fit()
    want = "bf16" if native else "fp32"
    assert trainer.precision == want and used and set(used) == {want}
    assert load_checkpoint(Path(cfg.run_dir) / "checkpoint_last.pt")["config"]["train"]["precision"] == "auto"


def test_tensorboard_mirrors_metrics_jsonl_and_a_resumed_run_appends_without_repeating_steps(tmp_path, caplog,
                                                                                            monkeypatch):
    import re
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: a log line per log_every, with the ETA
    corpus = _write_corpus(tmp_path / "pairs")
    cfg = _tiny_config(tmp_path, corpus, "train.log_to=[tensorboard]", "train.max_steps=20", "train.save_every=10",
                       "train.validate_every=10", "train.valid_bleu=false", "train.average_last=0")
    with caplog.at_level("INFO", logger="mt.train"):
        Trainer(cfg, prepare_data(cfg.data, cfg.run_dir)).fit()
    assert any(re.fullmatch(r"step 15/20: loss .*, \d+ tokens/s, ETA \d\d:\d\d", m) for m in caplog.messages)
    run = Path(cfg.run_dir)
    # As if killed after logging step 20 but before its checkpoint: the resumed run logs 15 and 20 again.
    (run / "checkpoint_last.pt").unlink()  # (a hard link to checkpoint_20.pt)
    shutil.copyfile(run / "checkpoint_10.pt", run / "checkpoint_last.pt")
    Trainer(cfg, prepare_data(cfg.data, cfg.run_dir), resume=True).fit()

    expected: dict[str, dict[int, float]] = {}  # tag -> step -> the value logged last
    for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        group = "valid" if "valid_loss" in record else "run" if "hardware" in record else "train"
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                expected.setdefault(f"{group}/{key.removeprefix('valid_')}", {})[record["step"]] = value
    assert sorted(expected["train/loss"]) == [5, 10, 15, 20] and sorted(expected["valid/loss"]) == [10, 20]
    assert sorted(expected["run/peak_flops"]) == [0, 10]  # each start's measurement
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # appended, not restarted
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, values in expected.items():
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == sorted(values), tag  # each step once: the killed process's purged
        assert [e.value for e in scalars] == pytest.approx([values[s] for s in sorted(values)], rel=1e-6), tag


def test_log_to_accepts_tensorboard_only():
    assert load_config("configs/tiny.yaml", ["train.log_to=[tensorboard]"]).train.log_to == ["tensorboard"]
    assert load_config("configs/tiny.yaml").train.log_to == []
    with pytest.raises(MTError, match=r"train.log_to\[0\] must be one of tensorboard, got 'wandb'"):
        load_config("configs/tiny.yaml", ["train.log_to=[wandb]"])
    with pytest.raises(MTError, match="train.log_to must be a list"):
        load_config("configs/tiny.yaml", ["train.log_to=tensorboard"])


def test_log_to_tensorboard_without_the_package_is_a_one_line_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    corpus = _write_corpus(tmp_path / "pairs", n=20)
    cfg = _tiny_config(tmp_path, corpus, "train.log_to=[tensorboard]")
    message = r'^train.log_to: tensorboard needs the tensorboard package: pip install -e "\.\[plot\]"$'
    with pytest.raises(MTError, match=message):
        Trainer(cfg, prepare_data(cfg.data, cfg.run_dir))
    assert not (Path(cfg.run_dir) / "metrics.jsonl").exists()
