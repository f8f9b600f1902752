"""The optimiser and its learning-rate schedule (Section 5.3), as small pure functions."""

from __future__ import annotations

import torch

from mt.config import TrainConfig


def learning_rate(step: int, cfg: TrainConfig, d_model: int, done: float = 0.0) -> float:
    """The learning rate of optimiser step `step` (counted from 1).

    `inverse_sqrt`, Equation 3: lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), times
    `lr_scale`. With `peak_lr` set, the same curve is rescaled to reach `peak_lr` at step = warmup_steps, which
    is easier to tune for a small model than a multiplier on d_model^-0.5.

    `linear`: peak * min(step / warmup_steps, 1 - done), a linear warmup, then a straight line to zero at the
    end of the run. `done` in [0, 1] is the fraction of the run's steps taken: of max_steps, or of the steps a
    wall-time budget comes to. A run under a time budget then ends annealed instead of at a high learning rate
    (Li et al., 2020, "Budgeted training"), and its last checkpoints are worth averaging. The peak is that of
    the inverse-sqrt curve (peak_lr, or lr_scale * (d_model * warmup_steps)^-0.5).
    """
    step, warmup = max(step, 1), cfg.warmup_steps
    peak = cfg.peak_lr if cfg.peak_lr is not None else cfg.lr_scale * (d_model * warmup) ** -0.5
    if cfg.lr_schedule == "linear":
        return peak * max(0.0, min(step / warmup, 1.0 - done))
    return peak * min(step ** -0.5, step * warmup ** -1.5) * warmup ** 0.5


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the paper's beta1 = 0.9, beta2 = 0.98, epsilon = 1e-9 (Section 5.3), fused where supported."""
    kwargs = dict(lr=0.0, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(model.parameters(), foreach=device.type == "cuda", **kwargs)
