"""Training: the loss, the schedule, overfitting a tiny corpus, kill-and-resume, checkpoints."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mt.checkpoint import average_checkpoints, load_checkpoint, load_for_inference, step_checkpoints
from mt.config import TrainConfig, load_config
from mt.data import prepare_data
from mt.errors import MTError
import mt.model
from mt import train as train_module
from mt.train import Trainer, label_smoothed_loss, learning_rate

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def test_label_smoothed_loss_matches_hand_computation():
    # Two real targets and one pad over a vocabulary of 3; epsilon 0.1.
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]])
    target = torch.tensor([0, 2, 1])
    pad = 1
    lp = F.log_softmax(logits, -1)
    nll = -(lp[0, 0] + lp[1, 2])
    smooth = 0.9 * nll + 0.1 * (-(lp[0].sum() + lp[1].sum()) / 3)
    loss, got_nll = label_smoothed_loss(logits, target, 0.1, pad=pad)
    torch.testing.assert_close(got_nll, nll)
    torch.testing.assert_close(loss, smooth)


def test_label_smoothed_loss_equals_torch_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    logits, target = torch.randn(40, 11), torch.randint(0, 11, (40,))
    loss, nll = label_smoothed_loss(logits, target, 0.1, pad=0)
    ref = F.cross_entropy(logits, target, label_smoothing=0.1, ignore_index=0, reduction="sum")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(nll, F.cross_entropy(logits, target, ignore_index=0, reduction="sum"))


@pytest.mark.parametrize("weights", [(1.0, 0.0), (2.0, 0.5), (0.0, 1.0)])  # d(a * loss + b * nll)
@pytest.mark.parametrize("chunk", [1 << 22, 3 * 11])  # one chunk, or chunks of 3 rows with a ragged last one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_smoothed_loss_gradients_equal_autograds_in_any_chunking(monkeypatch, chunk, dtype, weights):
    import mt.train

    monkeypatch.setattr(mt.train, "LOSS_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    logits = (3 * torch.randn(40, 11)).to(dtype).requires_grad_()
    target = torch.randint(0, 11, (40,))
    target[::6] = 0  # padding
    a, b = weights
    loss, nll = label_smoothed_loss(logits, target, 0.1, pad=0)
    (a * loss if b == 0 else b * nll if a == 0 else a * loss + b * nll).backward()  # unused outputs: no gradient
    ours, logits.grad = logits.grad, None
    ref_loss = F.cross_entropy(logits.float(), target, label_smoothing=0.1, ignore_index=0, reduction="sum")
    ref_nll = F.cross_entropy(logits.float(), target, ignore_index=0, reduction="sum")
    (a * ref_loss + b * ref_nll).backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(nll, ref_nll)
    assert ours.dtype == dtype
    # The training case (the loss alone) rounds once, as autograd's float32 gradient cast to bf16. With the nll's
    # gradient too, bf16 rounds twice: within 2^-12 of gradients of up to ~2.5.
    atol = 2 ** -12 if dtype == torch.bfloat16 and b else None
    torch.testing.assert_close(ours, logits.grad, atol=atol, rtol=None if atol is None else 1.6e-2)
    assert ours[::6].abs().max() == 0  # padding rows get no gradient


def test_label_smoothed_loss_reusing_the_logits_gives_the_same_gradient_and_autograd_guards_misuse():
    torch.manual_seed(0)
    w = torch.randn(6, 9, requires_grad=True)
    h, target = torch.randn(12, 6), torch.randint(1, 9, (12,))
    grads = []
    for reuse in (False, True):
        loss, _ = label_smoothed_loss(h @ w, target, 0.1, pad=0, reuse_logits=reuse)
        loss.backward()
        grads.append(w.grad)
        w.grad = None
    torch.testing.assert_close(grads[1], grads[0])
    # exp saves its output for its backward: overwriting it must not pass silently.
    loss, _ = label_smoothed_loss((h @ w).exp(), target, 0.1, pad=0, reuse_logits=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_label_smoothed_loss_gradient_survives_the_scale_of_a_real_step(dtype):
    # The trainer differentiates loss * world / n_tokens, and fp16 with GradScaler multiplies by 2^16 on top.
    # fp16 must round the gradient once, after scaling: rounded before, eps / V (3e-6 at 32k) is subnormal.
    torch.manual_seed(0)
    logits = (3 * torch.randn(64, 32000)).to(dtype).requires_grad_()
    target = torch.randint(1, 32000, (64,))
    scale = (2.0 ** 16 if dtype == torch.float16 else 1.0) / 3000
    loss, _ = label_smoothed_loss(logits, target, 0.1, pad=0)
    (loss * scale).backward()
    ref = logits.detach().double().requires_grad_()
    (F.cross_entropy(ref, target, label_smoothing=0.1, ignore_index=0, reduction="sum") * scale).backward()
    expected = ref.grad.to(dtype).double()  # the exact gradient, rounded once
    if dtype == torch.float16:
        torch.testing.assert_close(logits.grad.double(), expected, rtol=2 ** -10, atol=2 ** -24)
    else:  # bf16 rounds twice (stored, then scaled): within two of its ulps
        torch.testing.assert_close(logits.grad.double(), expected, rtol=2 ** -7, atol=0)


def test_label_smoothed_loss_will_not_overwrite_a_leaf():
    leaf = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(ValueError, match="leaf"):
        label_smoothed_loss(leaf, torch.tensor([1, 2, 0, 3]), 0.1, pad=0, reuse_logits=True)


def test_label_smoothed_loss_backward_twice_is_an_error():
    logits = torch.randn(4, 5, requires_grad=True)
    loss, _ = label_smoothed_loss(logits, torch.tensor([1, 2, 0, 3]), 0.1, pad=0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward called twice"):
        loss.backward()


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


def test_linear_schedule_reaches_the_optimiser_from_steps_and_from_the_wall_time_budget(tmp_path, caplog,
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
    lines = [r.getMessage() for r in caplog.records if r.getMessage().endswith("tokens/s")]
    assert [line.split(":")[0] for line in lines] == [f"step {s}" for s in range(1, 21)]
    assert f"lr {expected[-1]:.2e}," in lines[-1]
    # A wall-time budget half spent halves the rate, whatever the step count says.
    batch = next(trainer.micro_batches())[0]
    trainer.progress.step, trainer.time_done = 5, 0.5
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
    real_step, real_validate = Trainer.train_step, Trainer.validate

    def step(self, *args):
        clock["now"] += 1.0
        return real_step(self, *args)

    def validate(self):
        clock["now"] += 100.0
        return real_validate(self)

    def save(self, *args, **kwargs):
        clock["now"] += 100.0
        return real_save(self, *args, **kwargs)

    real_save = Trainer.save
    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(Trainer, "validate", validate)
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


def test_auto_precision_is_bf16_only_where_the_device_has_it_natively(monkeypatch):
    from mt.train import resolve_precision

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for flags, want in (((True, False), "bf16"), ((False, True), "bf16"), ((False, False), "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=flags[0]: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=flags[1]: v, raising=False)
        assert resolve_precision("auto", cpu) == want, flags
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    for capability, want in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, v=capability: v)
        assert resolve_precision("auto", gpu) == want


@pytest.mark.parametrize("native", [True, False])
def test_trainer_with_auto_precision_trains_in_what_it_resolved(tmp_path, monkeypatch, native):
    monkeypatch.setattr(mt.model, "native_bf16", lambda device: native)
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
