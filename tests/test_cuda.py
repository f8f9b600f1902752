"""The CUDA paths, checked against the CPU: the model, the GPU-sized loss chunks, beam search with its
periodic host reads, and training in bf16 and fp16 (loss scaling) with a kill-and-resume. Skipped where no
CUDA device is present (CI); run on a GPU machine with `python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import mt.loss
from mt.checkpoint import load_checkpoint
from mt.config import ModelConfig, load_config
from mt.data import prepare_data
from mt.fast import speed_up
from mt.model import Transformer
from mt.search import beam_search
from mt.loss import label_smoothed_loss
from mt.train import Trainer

from conftest import ROOT, write_pairs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PAD, BOS, EOS = 0, 2, 3


def _model(seed: int = 0, dropout: float = 0.0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=2, d_ff=128, dropout=dropout)
    return speed_up(Transformer(cfg, 97, 97, pad_id=PAD, share_all_embeddings=True))  # as build_model makes it


def _padded_batch(seed: int = 1, batch: int = 6, src_len: int = 11, tgt_len: int = 9):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 97, (batch, src_len), generator=g)
    tgt = torch.randint(4, 97, (batch, tgt_len), generator=g)
    for i in range(batch):  # ragged: every row but the first ends in padding
        src[i, src_len - i:] = PAD
        tgt[i, tgt_len - i // 2:] = PAD
    return src, tgt


def test_model_on_cuda_matches_the_cpu_in_outputs_and_gradients():
    cpu = _model()
    gpu = copy.deepcopy(cpu).cuda()
    src, tgt = _padded_batch()
    out_cpu = cpu(src, tgt)
    out_gpu = gpu(src.cuda(), tgt.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-4, rtol=1e-4)
    out_cpu.square().mean().backward()
    out_gpu.square().mean().backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1 << 26, 5000])  # the GPU's default (one chunk here), and many
def test_loss_on_cuda_matches_the_cpu_in_value_and_gradient(monkeypatch, dtype, chunk_elements):
    monkeypatch.setattr(mt.loss, "GPU_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    logits = (3 * torch.randn(300, 1000)).to(dtype)
    target = torch.randint(0, 1000, (300,))
    target[::7] = PAD
    results = []
    for device in ("cpu", "cuda"):
        x = logits.to(device, copy=True).requires_grad_()
        loss, nll = label_smoothed_loss(x, target.to(device), 0.1, pad=PAD)
        (loss + 0.5 * nll).backward()
        results.append((loss.cpu(), nll.cpu(), x.grad.float().cpu()))
    (l_cpu, n_cpu, g_cpu), (l_gpu, n_gpu, g_gpu) = results
    torch.testing.assert_close(l_gpu, l_cpu, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(n_gpu, n_cpu, rtol=1e-5, atol=1e-3)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(g_gpu, g_cpu, rtol=tol, atol=tol)
    assert g_gpu[::7].abs().max() == 0  # padding rows get no gradient
    assert g_gpu[1].abs().sum() > 0


def test_beam_search_on_cuda_matches_the_cpu_and_does_not_depend_on_the_sync_period():
    model = _model(seed=3).eval()
    src, _ = _padded_batch(seed=4, batch=8, src_len=12)
    kwargs = dict(beam_size=4, alpha=0.6, bos=BOS, eos=EOS, pad=PAD, max_len_a=1.0, max_len_b=5, nbest=2)
    with torch.inference_mode():
        ref = beam_search(model, src, **kwargs)
        gpu_model = copy.deepcopy(model).cuda()
        outs = [beam_search(gpu_model, src.cuda(), sync_every=k, **kwargs) for k in (None, 1, 3)]
    assert ref.tokens.size(-1) > 5  # the search ran for more than one sync period
    for out in outs:
        assert torch.equal(out.tokens.cpu(), ref.tokens)
        torch.testing.assert_close(out.scores.cpu(), ref.scores, atol=1e-4, rtol=1e-4)


def test_attention_on_cuda_avoids_cudnn_kernels_that_rebuild_per_shape():
    from torch.profiler import ProfilerActivity, profile

    model = _model(seed=5, dropout=0.1).cuda().train()
    src, tgt = _padded_batch(seed=6)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):  # where cuDNN's kernel would be chosen (Hopper)
            out = model(src.cuda(), tgt.cuda())
        out.float().square().mean().backward()
        torch.cuda.synchronize()
    kernels = [e.key for e in prof.key_averages()]
    assert any("fmha" in k.lower() or "attention" in k.lower() or "flash" in k.lower() for k in kernels), kernels
    assert not [k for k in kernels if "cudnn" in k.lower()]  # fails only where cuDNN's kernel is the default


def test_every_attention_call_on_cuda_runs_with_cudnn_attention_off(monkeypatch):
    # The same property on any GPU: inside each SDPA call, cuDNN's backend is disabled.
    import mt.model

    seen, before = [], torch.backends.cuda.cudnn_sdp_enabled()
    real = mt.model.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(mt.model.F, "scaled_dot_product_attention", spy)
    model = _model(seed=7).cuda()
    src, tgt = _padded_batch(seed=8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(src.cuda(), tgt.cuda()).float().sum().backward()
    with torch.inference_mode():
        beam_search(model.eval(), src.cuda(), beam_size=2, bos=BOS, eos=EOS, pad=PAD, max_len_b=3)
    assert len(seen) > 6 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before  # the setting is put back after each call


def _config(tmp_path: Path, name: str, *extra: str):
    prefix = write_pairs(tmp_path / "pairs", 200)
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={tmp_path / name}", f"data.train={prefix}", f"data.valid={prefix}", "train.device=cuda",
        "model.d_model=64", "model.d_ff=128", "data.max_tokens=512", "train.average_last=0", *extra])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_on_cuda_lowers_the_loss_and_saves_a_checkpoint_the_cpu_can_load(tmp_path, precision):
    cfg = _config(tmp_path, precision, f"train.precision={precision}", "train.max_steps=150",
                  "train.validate_every=150", "train.save_every=150", "train.peak_lr=3e-3", "train.log_every=25")
    result = Trainer(cfg, prepare_data(cfg.data, cfg.run_dir)).fit()
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.85 * losses[0], losses  # untrained, it would stay flat
    assert result.last_valid["valid_ppl"] < float("inf")
    ckpt = load_checkpoint(Path(cfg.run_dir) / "checkpoint_last.pt")  # loads onto the CPU
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    scale = ckpt["scaler"].get("scale")
    assert (scale is not None) == (precision == "fp16")  # the loss scale is kept only where it is used


def test_killed_and_resumed_cuda_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    common = ["model.dropout=0.1", "train.validate_every=100", "train.save_every=4", "train.valid_bleu=false",
              "train.precision=bf16", "train.keep_checkpoints=5"]
    straight = _config(tmp_path, "a", "train.max_steps=10", *common)
    Trainer(straight, prepare_data(straight.data, straight.run_dir)).fit()
    first = _config(tmp_path, "b", "train.max_steps=6", *common)  # its last checkpoint is at step 6
    Trainer(first, prepare_data(first.data, first.run_dir)).fit()
    resumed = _config(tmp_path, "b", "train.max_steps=10", *common)
    Trainer(resumed, prepare_data(resumed.data, resumed.run_dir), resume=True).fit()
    a = load_checkpoint(Path(straight.run_dir) / "checkpoint_last.pt")
    b = load_checkpoint(Path(resumed.run_dir) / "checkpoint_last.pt")
    start = load_checkpoint(Path(resumed.run_dir) / "checkpoint_4.pt")["model"]
    assert a["progress"]["step"] == b["progress"]["step"] == 10
    # GPU kernels may sum in a different order from run to run (atomics), and Adam magnifies the rounding of
    # near-zero gradients: the runs agree up to a small fraction of how far the weights moved since step 4,
    # where other dropout masks after the resume would give a difference of the order of the movement itself.
    flat = lambda state: torch.cat([t.flatten().float() for t in state.values()])  # noqa: E731
    moved = (flat(a["model"]) - flat(start)).norm()
    assert moved > 1e-2
    assert (flat(b["model"]) - flat(a["model"])).norm() < 0.02 * moved
