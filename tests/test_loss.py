"""The label-smoothed loss: the plain reference against PyTorch's cross-entropy and a hand-written target
distribution, and the fused loss against the reference (values and gradients, any chunking, both ways of
spreading the smoothing mass, reduced precision, misuse)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mt.loss
from mt.loss import label_smoothed_loss, label_smoothed_loss_reference


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
    monkeypatch.setattr(mt.loss, "CPU_CHUNK_ELEMENTS", chunk)
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


def _smoothed_target(target: torch.Tensor, vocab: int, epsilon: float, pad: int) -> torch.Tensor:
    """JoeyNMT's / OpenNMT's target, built the way they build it: epsilon / (V - 2) everywhere, 1 - epsilon at
    the reference, 0 at padding."""
    q = torch.full((target.numel(), vocab), epsilon / (vocab - 2))
    q.scatter_(1, target[:, None], 1.0 - epsilon)
    q[:, pad] = 0.0
    return q


def test_reference_excluding_padding_equals_joeynmts_target_distribution():
    torch.manual_seed(0)
    logits, target = torch.randn(30, 13), torch.randint(0, 13, (30,))
    pad = 1
    target[::5] = pad
    loss, nll = label_smoothed_loss_reference(logits, target, 0.1, pad=pad, exclude_pad=True)
    lprobs = logits.log_softmax(-1)
    keep = target.ne(pad)
    expected = -(_smoothed_target(target, 13, 0.1, pad) * lprobs).sum(-1)[keep].sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, F.nll_loss(lprobs, target, ignore_index=pad, reduction="sum"))
    # The two ways of spreading epsilon differ: this is not the default loss under another name.
    assert not torch.allclose(loss, label_smoothed_loss_reference(logits, target, 0.1, pad=pad)[0])


@pytest.mark.parametrize("exclude_pad", [False, True])
@pytest.mark.parametrize("chunk", [1 << 20, 3 * 13])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.5, 2.0)])
def test_fused_loss_equals_the_plain_reference_in_value_and_gradient(monkeypatch, exclude_pad, chunk, weights):
    monkeypatch.setattr(mt.loss, "CPU_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(1)
    logits = (3 * torch.randn(50, 13)).requires_grad_()
    target = torch.randint(0, 13, (50,))
    target[::7] = 2  # padding
    a, b = weights
    grads, values = [], []
    for fn in (label_smoothed_loss, label_smoothed_loss_reference):
        loss, nll = fn(logits, target, 0.2, pad=2, exclude_pad=exclude_pad)
        (a * loss + b * nll).backward()
        grads.append(logits.grad)
        values.append((loss, nll))
        logits.grad = None
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(grads[0], grads[1])
    if exclude_pad and b == 0:  # q is 0 at padding: the gradient there is p_pad, on real rows
        p = logits.detach().softmax(-1)
        real = target.ne(2)
        torch.testing.assert_close(grads[0][real, 2], a * p[real, 2])
