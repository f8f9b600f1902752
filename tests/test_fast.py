"""mt.fast against the plain paths of mt.model, its oracle: the CPU dropout, the spelled-out bf16 attention,
the cuDNN filter, and whole models with and without `speed_up`."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import mt.fast
from mt.checkpoint import build_model
from mt.config import ModelConfig
from mt.model import MultiHeadAttention, Transformer, padding_mask, sdpa_attention

PAD, BOS, V = 0, 2, 50
D, H, FF = 32, 2, 64


def fast_attention(attention_dropout: float, cross: bool) -> MultiHeadAttention:
    torch.manual_seed(0)
    return mt.fast.speed_up(MultiHeadAttention(D, H, attention_dropout=attention_dropout, cross=cross))


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    kw.setdefault("dropout", 0.0)
    return Transformer(ModelConfig(d_model=D, n_heads=H, n_layers=2, d_ff=FF, **kw), V, V, pad_id=PAD,
                       share_all_embeddings=True)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(4, V, (3, 7), generator=g), torch.randint(4, V, (3, 6), generator=g)
    src[1, 4:] = PAD
    tgt[:, 0] = BOS
    tgt[2, 4:] = PAD
    return src, tgt


def test_speed_up_swaps_every_dropout_and_attention_kernel_and_keeps_the_weights():
    plain = tiny(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    fast = mt.fast.speed_up(copy.deepcopy(plain))
    dropouts = [m for m in fast.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is mt.fast.Dropout for m in dropouts)
    assert sum(isinstance(m, nn.Dropout) for m in plain.modules()) == len(dropouts)
    attentions = [m for m in fast.modules() if isinstance(m, MultiHeadAttention)]
    assert len(attentions) == 6 and all(m.kernel is mt.fast.attention for m in attentions)
    assert all(m.kernel is sdpa_attention for m in plain.modules() if isinstance(m, MultiHeadAttention))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fast.state_dict().values()))
    spec = {"cfg": {"d_model": D, "n_heads": H, "n_layers": 1, "d_ff": FF}, "src_vocab_size": V,
            "tgt_vocab_size": V, "pad_id": PAD, "share_all_embeddings": True}
    assert any(type(m) is mt.fast.Dropout for m in build_model(spec).modules())
    assert not any(type(m) is mt.fast.Dropout for m in build_model(spec, fast=False).modules())


def _forward_backward(model: Transformer, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    src, tgt = batch()
    model.train()  # dropout 0: deterministic, and the training paths are taken
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(src, tgt)
    logits.float().logsumexp(-1).sum().backward()
    return logits.float(), [p.grad.clone() for p in model.parameters()]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_model_computes_the_plain_models_function_and_gradients(dtype):
    plain = tiny()
    fast = mt.fast.speed_up(copy.deepcopy(plain))
    src, tgt = batch()
    truth = _forward_backward(copy.deepcopy(plain), bf16=False)  # float32, the plain path
    if dtype == torch.float32:  # both take SDPA here: this proves speed_up leaves the function alone
        logits, grads = _forward_backward(fast, bf16=False)
        assert_close(logits, truth[0], atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, truth[1]):
            assert_close(got, want, atol=1e-5, rtol=1e-4)
    else:
        # bf16 rounds differently on each path (the spelled-out one rounds the probabilities to bf16 before
        # the second product, SDPA does not): the fast path must stay within a small factor of the plain
        # one's distance to float32. A wrong mask or scale puts it at tens of percent.
        plain_out, fast_out = _forward_backward(plain, bf16=True), _forward_backward(fast, bf16=True)
        assert _relative_error(fast_out[0], truth[0]) < 1.5 * _relative_error(plain_out[0], truth[0]) + 1e-3
        for got, plain_got, want in zip(fast_out[1], plain_out[1], truth[1]):
            assert _relative_error(got, want) < 3 * _relative_error(plain_got, want) + 1e-2
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    # Incremental decoding in bf16 (the decoding step's spelled-out attention) against the plain model's.
    plain.eval(), fast.eval()
    with torch.inference_mode():
        steps = []
        for model in (plain, fast):
            model.to(dtype)
            state = model.start_decoding(src)
            steps.append(torch.stack([model.decode_step(tgt[:, t], state).float() for t in range(tgt.size(1))]))
    assert_close(steps[1], steps[0], **tol)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_cpu_dropout_mask_drops_a_fraction_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_003, requires_grad=True)  # not a multiple of the four masks a 64-bit draw makes
    drop = mt.fast.Dropout(p).train()
    y = drop(x)
    zeros = (y == 0).float().mean().item()
    assert abs(zeros - p) < 5 * math.sqrt(p * (1 - p) / x.numel())  # five standard errors
    kept = y[y != 0]
    assert_close(kept, torch.full_like(kept, 1 / (1 - p)), atol=1e-4, rtol=1e-4)
    assert abs(y.mean().item() - 1.0) < 0.005
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the kept elements, with their scale
    for rows in range(4):  # each 16-bit lane of a draw drops at rate p (a sign bit stuck at 0 would bias one)
        lane = (y.detach()[:1_000_000].view(-1, 4)[:, rows] == 0).float().mean().item()
        assert abs(lane - p) < 5 * math.sqrt(p * (1 - p) / 250_000)
    assert not torch.equal(drop(x), drop(x))
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_dropout_of_reduced_precision_and_strided_inputs_is_a_scaled_mask(dtype):
    torch.manual_seed(1)
    base = torch.randn(300, 200).to(dtype)
    x = base.t().requires_grad_()  # not contiguous
    y = mt.fast.Dropout(0.1).train()(x)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.01
    # Kept elements are x / (1 - p), rounded once from float32, and the gradient flows through them alone.
    scale = 65536 / (65536 - round(0.1 * 65536))
    assert torch.equal(y[kept], (x.detach().float() * scale).to(dtype)[kept])
    g = torch.randn(x.shape).to(dtype)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(kept, (g.float() * scale).to(dtype), 0).to(dtype))


def test_attention_kernels_on_cuda_leave_out_cudnn_and_keep_a_users_choice():
    cuda, B = torch.backends.cuda, torch.nn.attention.SDPBackend
    assert mt.fast.sdpa_backends_without_cudnn() == [B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH]
    cuda.enable_flash_sdp(False)
    try:
        assert mt.fast.sdpa_backends_without_cudnn() == [B.EFFICIENT_ATTENTION, B.MATH]
    finally:
        cuda.enable_flash_sdp(True)


@pytest.mark.parametrize("extra", [0, 14])  # short and long rows of keys
@pytest.mark.parametrize("cross", [False, True])
def test_bf16_cpu_training_attention_equals_sdpa_in_float32(cross, extra, monkeypatch):
    calls = []
    spelled_out = mt.fast.attention_spelled_out
    monkeypatch.setattr(mt.fast, "attention_spelled_out", lambda *a: calls.append(1) or spelled_out(*a))
    torch.manual_seed(0)
    attn = fast_attention(attention_dropout=0.0, cross=cross)
    x, memory = torch.randn(3, 6 + extra, D), torch.randn(3, 7 + extra, D)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3, [False] * 6 + [True]])
    mask = padding_mask(torch.cat([torch.zeros(3, extra, dtype=torch.bool), pad], dim=1))
    args = (memory, mask) if cross else (None, None, True)
    ref = attn(x, *args)  # float32: scaled_dot_product_attention
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, *args)  # bf16 with grad enabled on the CPU: the spelled-out Equation 1
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and calls  # it went through the spelled-out path
    assert_close(out.float(), ref, atol=0.03, rtol=0.03)
    for p, g in zip(attn.parameters(), ref_grads):
        assert_close(p.grad, g, atol=0.05 * g.abs().max().item(), rtol=0.05)
    dropping = fast_attention(attention_dropout=0.3, cross=cross)
    dropping.load_state_dict(attn.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(dropping(x, *args), dropping(x, *args))  # the probabilities are dropped
        assert torch.equal(dropping.eval()(x, *args), out)


@pytest.mark.parametrize("keys", [5, 21])
def test_bf16_cpu_inference_keeps_the_fused_kernel_and_equals_float32(keys, monkeypatch):
    # Inference in bf16, a decoding step included (the beams of each sentence over its source), stays with SDPA,
    # the faster there; a source row of padding only attends to nothing, not NaN.
    calls = []
    spelled_out = mt.fast.attention_spelled_out
    monkeypatch.setattr(mt.fast, "attention_spelled_out", lambda *a: calls.append(1) or spelled_out(*a))
    torch.manual_seed(0)
    attn = fast_attention(attention_dropout=0.0, cross=True).eval()
    x, memory = torch.randn(3 * 4, 1, D), torch.randn(3, keys, D)
    pad = torch.zeros(3, keys, dtype=torch.bool)
    pad[1, keys - 2:] = True
    pad[2] = True  # nothing to see
    mask = padding_mask(pad)
    k, v = attn.project_kv(memory)
    with torch.no_grad():
        ref = attn.attend_grouped(x, k, v, mask, group=4)  # float32: SDPA
        got = attn.to(torch.bfloat16).attend_grouped(x.bfloat16(), k.bfloat16(), v.bfloat16(), mask, group=4)
    assert not calls and got.dtype == torch.bfloat16 and not got.isnan().any()
    assert_close(got.float(), ref, atol=0.03, rtol=0.03)


def test_bf16_cpu_attention_compiles_without_graph_breaks():
    torch.manual_seed(0)
    attn = fast_attention(attention_dropout=0.0, cross=True)
    x, memory = torch.randn(3, 5, D), torch.randn(3, 7, D)
    mask = padding_mask(torch.tensor([[False] * 7, [False] * 4 + [True] * 3, [False] * 6 + [True]]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(attn)(x, memory, mask)
    assert explained.graph_break_count == 0


def test_bf16_cpu_attention_keeps_sdpas_causal_alignment_and_zeros_for_rows_that_see_nothing():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, H, 3, D // H), torch.randn(2, H, 5, D // H), torch.randn(2, H, 5, D // H)
    mask = torch.tensor([True] * 5 + [False] * 5).view(2, 1, 1, 5)  # the second row may see no key
    for kw in (dict(causal=True), dict(mask=mask)):  # 3 queries, 5 keys: is_causal aligns at the top left
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=kw.get("mask"), is_causal=kw.get("causal", False))
        got = mt.fast.attention_spelled_out(q.bfloat16(), k.bfloat16(), v.bfloat16(), kw.get("mask"),
                                             kw.get("causal", False), 0.0)
        assert not got.isnan().any()
        assert_close(got.float(), ref, atol=0.03, rtol=0.03)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


@pytest.mark.parametrize("rows", [1, 31, 32, 33, 70])
def test_bf16_cpu_linears_compute_each_linear_on_a_multiple_of_32_rows_and_give_its_result(rows, monkeypatch):
    model = tiny().to(torch.bfloat16).eval()
    layer = model.decoder[0].ffn.linear1
    reference = copy.deepcopy(layer)
    mt.fast.bf16_cpu_linears(model)
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert model.output.weight is model.tgt_embed.embed.weight  # tying survives
    x = torch.randn(rows, 1, D, dtype=torch.bfloat16)
    with torch.no_grad():
        want = reference(x)
        packed = layer(x)
        layer.packed = None  # unpacked, the product goes through F.linear: see its shape
        shapes = []
        linear = torch.nn.functional.linear
        monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *a: shapes.append(x.shape) or linear(x, *a))
        got = layer(x)
    assert shapes == [(-(-rows // 32) * 32, D)] and got.shape == packed.shape == (rows, 1, FF)
    assert_close(got.float(), want.float(), atol=0.02, rtol=0.02)
    assert_close(packed.float(), want.float(), atol=0.02, rtol=0.02)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_bf16_cpu_linears_pack_each_weight_once_for_onednn_and_compute_nn_linears_result(monkeypatch):
    model = tiny().to(torch.bfloat16).eval()
    layers = [model.decoder[0].ffn.linear2, model.output]
    with torch.no_grad():
        layers[0].bias.normal_()  # initialised to zero: make a bias dropped show (the output layer has none)
    references = [copy.deepcopy(layer) for layer in layers]
    mt.fast.bf16_cpu_linears(model)
    assert all(m.packed is not None for m in model.modules() if isinstance(m, mt.fast.BF16CPULinear))
    xs = [torch.randn(45, 1, layer.in_features, dtype=torch.bfloat16) for layer in layers]
    with torch.no_grad():
        wants = [reference(x) for reference, x in zip(references, xs)]
        monkeypatch.setattr(torch.nn.functional, "linear", None)  # packed: F.linear must not run
        gots = [layer(x) for layer, x in zip(layers, xs)]
    monkeypatch.undo()
    for got, want in zip(gots, wants):
        assert got.shape == want.shape
        assert_close(got.float(), want.float(), atol=0.02, rtol=0.02)
    x = torch.randn(5, FF, dtype=torch.bfloat16, requires_grad=True)  # with autograd: F.linear, which has a backward
    layers[0](x).sum().backward()
    assert_close(x.grad.float(), references[0].weight.sum(0).float().expand(5, -1), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shape", [(D,), (0, D), (0, 3, D), (3, 0, D)])
def test_a_bf16_cpu_linear_gives_nn_linears_shapes_for_one_dimensional_and_empty_inputs(shape, packed):
    layer = nn.Linear(D, FF).to(torch.bfloat16)
    bucketed = copy.deepcopy(layer)
    bucketed.__class__ = mt.fast.BF16CPULinear
    if packed:
        bucketed.pack()
    x = torch.randn(shape, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_close(bucketed(x).float(), layer(x).float(), atol=0.02, rtol=0.02)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_a_packed_bf16_cpu_linear_unpacks_when_cast_or_copied_and_still_computes_its_function():
    layer = nn.Linear(D, FF).to(torch.bfloat16)
    x = torch.randn(3, D)
    with torch.no_grad():
        want = layer.float()(x)
        packed = mt.fast.bf16_cpu_linears(layer.to(torch.bfloat16))
        assert packed.packed is not None
        for other in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed)), packed.float()):
            assert other.packed is None
            assert_close(other(x.to(other.weight.dtype)).float(), want, atol=0.05, rtol=0.02)


def test_a_bf16_cpu_linear_is_left_unpacked_where_onednn_has_no_bf16_path_on_this_cpu(monkeypatch):
    # packing raises on a CPU without AVX512BW/VL/DQ or AVX-NE-CONVERT (as under ONEDNN_MAX_CPU_ISA=AVX2)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    layer = nn.Linear(D, FF).to(torch.bfloat16)
    bucketed = copy.deepcopy(layer)
    bucketed.__class__ = mt.fast.BF16CPULinear
    assert bucketed.pack().packed is None
    x = torch.randn(3, D, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_close(bucketed(x).float(), layer(x).float(), atol=0.02, rtol=0.02)
