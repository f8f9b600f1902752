"""Label-smoothed cross-entropy (Section 5.4; Szegedy et al., 2016): the plain reference and the fused loss
the trainer runs.

Both return (loss, nll) summed over non-pad targets: the smoothed loss to optimise and the plain negative
log-likelihood, from which perplexity is reported. The smoothed target q puts 1 - epsilon on the reference
and spreads epsilon over the vocabulary in one of two ways:

- over all V types, the reference included (`F.cross_entropy(label_smoothing=)`): the default;
- `exclude_pad`: over the V - 2 types that are neither the reference nor padding (JoeyNMT, OpenNMT), so no
  probability mass is taught to go to a token the model never has to produce.

`label_smoothed_loss_reference` is the definition, written with autograd; `label_smoothed_loss` computes the
same numbers chunk by chunk with its gradient made in the forward pass, and is tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mt.data import PAD


def label_smoothed_loss_reference(logits: Tensor, target: Tensor, epsilon: float, pad: int = PAD,
                                  exclude_pad: bool = False) -> tuple[Tensor, Tensor]:
    """logits (n, V), target (n,) -> (loss, nll), float32 scalars. The oracle of `label_smoothed_loss`."""
    lprobs = logits.float().log_softmax(dim=-1)
    nll = -lprobs.gather(-1, target[:, None]).squeeze(-1)
    if exclude_pad:
        smooth = (nll + lprobs.sum(dim=-1) - lprobs[:, pad]) / -(lprobs.size(-1) - 2)
        loss = (1.0 - epsilon) * nll + epsilon * smooth
    else:
        loss = (1.0 - epsilon) * nll - epsilon * lprobs.mean(dim=-1)
    keep = target.ne(pad)
    return loss[keep].sum(), nll[keep].sum()


# Logits per chunk of the fused loss: a 4 MB float32 chunk on a CPU, small enough for glibc to reuse memory
# the process already holds; 64x more on a GPU, where each chunk costs a few kernel launches instead.
CPU_CHUNK_ELEMENTS = 1 << 20
GPU_CHUNK_ELEMENTS = 1 << 26


def label_smoothed_loss(logits: Tensor, target: Tensor, epsilon: float, pad: int = PAD, exclude_pad: bool = False,
                        reuse_logits: bool = False) -> tuple[Tensor, Tensor]:
    """logits (n, V), target (n,) -> (loss, nll), float32 scalars, as `label_smoothed_loss_reference`; each can
    be differentiated, once.

    reuse_logits: the gradient overwrites `logits` (the training step's way; fp16 logits excepted, whose
    gradient stays float32 until scaled): the caller must not read them again, and they must be the output
    of an operation, not a leaf such as a parameter.
    """
    if reuse_logits and logits.is_leaf and logits.requires_grad:
        raise ValueError("label_smoothed_loss: reuse_logits would overwrite a leaf tensor; pass computed logits")
    return _FusedLabelSmoothedLoss.apply(logits, target, epsilon, pad, exclude_pad, reuse_logits)


def _smoothing(epsilon: float, vocab_size: int, exclude_pad: bool) -> tuple[float, float, float]:
    """q = uniform everywhere, + on_target at the reference, - off_pad at padding: (uniform, on_target, off_pad)."""
    if exclude_pad:
        uniform = epsilon / (vocab_size - 2)
        return uniform, 1.0 - epsilon - uniform, uniform
    return epsilon / vocab_size, 1.0 - epsilon, 0.0


class _FusedLabelSmoothedLoss(torch.autograd.Function):
    """One float32 softmax per chunk of rows gives both the loss and its gradient p - q; the backward pass only
    scales the stored gradient. Autograd's version keeps a float32 copy of the log-probabilities and makes
    several more (n, V) temporaries, the largest tensors of a training step.

    Per row, with p = softmax(x): lse = max(x) - log(max(p)) (max(p) >= 1 / V keeps the log well-conditioned),
    nll = lse - x[t], and loss = sum_i q_i (lse - x_i). The target's share is subtracted in float32 before the
    gradient is rounded to the logits' dtype: in bf16, p = 0.9 minus 0.9 would keep no digit. fp16 logits
    keep a float32 gradient until it is scaled, since epsilon / V falls below fp16's normal range.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, epsilon: float, pad: int, exclude_pad: bool,
                reuse_logits: bool):
        n, vocab_size = logits.shape
        uniform, on_target, off_pad = _smoothing(epsilon, vocab_size, exclude_pad)
        chunk_elements = CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else GPU_CHUNK_ELEMENTS
        rows = max(1, chunk_elements // vocab_size)
        keep = target.ne(pad)
        target_logit = logits.gather(-1, target[:, None]).squeeze(-1).float()  # before any overwrite
        lse, smooth = torch.empty(n, device=logits.device), torch.empty(n, device=logits.device)
        want_grad = ctx.needs_input_grad[0]
        grad_dtype = torch.float32 if logits.dtype == torch.float16 else logits.dtype
        if not want_grad:
            grad = None
        elif reuse_logits and grad_dtype == logits.dtype:
            grad = logits.detach()  # each chunk is read before it is overwritten
        else:
            grad = torch.empty_like(logits, dtype=grad_dtype)
        for i in range(0, n, rows):
            x = logits[i:i + rows].float()  # (rows, V)
            x_max, x_sum = x.amax(dim=-1), x.sum(dim=-1)  # while x is in the cache, before p is written
            p = torch.softmax(x, dim=-1)
            lse[i:i + rows] = lse_i = x_max - p.amax(dim=-1).log()
            smooth_i = lse_i - uniform * x_sum
            if off_pad:
                smooth_i += off_pad * x[:, pad]
            smooth[i:i + rows] = smooth_i
            if want_grad:  # p - q
                t = target[i:i + rows, None]
                p.scatter_add_(-1, t, p.new_full(t.shape, -on_target)).sub_(uniform)
                if off_pad:
                    p[:, pad] += off_pad
                grad[i:i + rows] = p.mul_(keep[i:i + rows, None])
        nll = (lse - target_logit).masked_fill(~keep, 0.0).sum()
        loss = (smooth - on_target * target_logit).masked_fill(~keep, 0.0).sum()
        ctx.grad, ctx.dtype, ctx.pad = grad, logits.dtype, pad
        ctx.smoothing = (uniform, on_target, off_pad)
        ctx.save_for_backward(target, keep)
        ctx.set_materialize_grads(False)  # None for an output with no gradient (nll, in training): no work for it
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, grad_nll: Tensor | None):
        target, keep = ctx.saved_tensors
        if ctx.grad is None:
            raise RuntimeError("label_smoothed_loss: backward called twice, or on logits that need no gradient")
        grad, ctx.grad = ctx.grad, None  # scaled in place, so released here: no second backward
        grad.mul_(sum(g for g in (grad_loss, grad_nll) if g is not None))
        if grad_nll is not None:  # d nll / d x = p - onehot(t) = (p - q) + (q - onehot(t))
            uniform, on_target, off_pad = ctx.smoothing
            k = keep.to(grad.dtype)[:, None]
            grad.add_(k * (grad_nll * uniform).to(grad.dtype))
            grad.scatter_add_(-1, target[:, None], k * (grad_nll * (on_target - 1.0)).to(grad.dtype))
            if off_pad:
                grad[:, ctx.pad:ctx.pad + 1] -= k * (grad_nll * off_pad).to(grad.dtype)
        return grad.to(ctx.dtype), None, None, None, None, None
