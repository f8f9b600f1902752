"""Later variants of the paper's building blocks, chosen by ModelConfig: RMSNorm (model.norm rms_pre), SwiGLU
(model.ffn swiglu) and rotary position embeddings (model.positions rope). The paper's own blocks stay in
mt.model; the decoder-only stack is mt.decoder_only.

Shapes: batch B, length L, model width D, heads H, head width Dh, hidden width F.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROPE_BASE = 10000.0  # the wavelengths of Section 3.5's sinusoids, as Su et al. (2021) take them


class RMSNorm(nn.Module):
    """Root mean square layer normalisation (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * g over the last
    dimension, no mean subtracted and no bias. Computed in float32 whatever x's dtype, as autocast runs
    LayerNorm."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D), x's dtype."""
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.size(0)}, eps={self.eps}"


def make_norm(kind: str, d_model: int) -> nn.Module:
    """The sub-layer normalisation of ModelConfig.norm: LayerNorm (post, pre) or RMSNorm (rms_pre)."""
    return RMSNorm(d_model) if kind == "rms_pre" else nn.LayerNorm(d_model)


class SwiGLU(nn.Module):
    """The gated feed-forward network of Shazeer (2020), FFN(x) = (Swish(x W) * x V) W2, Swish = SiLU, without
    biases as there. Three matrices: a hidden width of 2/3 d_ff holds the ReLU layer's parameters."""

    def __init__(self, d_model: int, d_ff: int, activation_dropout: float):
        super().__init__()
        self.w = nn.Linear(d_model, d_ff, bias=False)  # the gate
        self.v = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        return self.w2(self.dropout(F.silu(self.w(x)) * self.v(x)))


# --------------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_angles(positions: Tensor, d_head: int) -> Tensor:
    """positions (...) long -> angles (..., Dh / 2) float32: position * ROPE_BASE^(-2i / Dh), frequency i for
    the pair of dimensions (i, i + Dh / 2). Computed in float64, as the sinusoids are."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, d_head, 2, dtype=torch.float64, device=positions.device) / d_head)
    return (positions.double().unsqueeze(-1) * inv_freq).float()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair of dimensions (i, i + Dh / 2) of x (B, H, L, Dh) by its angle: cos, sin broadcastable to
    (B, H, L, Dh / 2) -> (B, H, L, Dh) in x's dtype. The halves layout (GPT-NeoX's) of Su et al.'s rotation: the
    same scores as interleaved pairs, with contiguous slices."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al., 2021) for self-attention's queries and keys: position m rotates
    its vectors by m times each frequency, so a score q_m . k_n depends on the offset m - n alone. Holds a
    cos/sin table, not saved in checkpoints (a function of its shape) and extended on demand."""

    def __init__(self, d_head: int, max_positions: int):
        super().__init__()
        self.d_head = d_head
        angles = rope_angles(torch.arange(max_positions), d_head)
        self.register_buffer("cos", angles.cos(), persistent=False)  # (P, Dh / 2)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _extend(self, n_positions: int) -> None:
        # As mt.model.Embeddings._extend: doubled, and built outside inference mode.
        n = max(n_positions, 2 * self.cos.size(0))
        with torch.inference_mode(False), torch.no_grad():
            angles = rope_angles(torch.arange(n, device=self.cos.device), self.d_head)
            self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, q: Tensor, k: Tensor, positions: int | Tensor = 0, end: int = 0) -> tuple[Tensor, Tensor]:
        """q, k (B, H, L, Dh); positions: the first position (an int: positions .. positions + L - 1 in every
        row) or (B, L) long, each row's own, all below `end` (known on the host, so the table is grown without
        reading the device) -> q, k rotated, same shapes."""
        if isinstance(positions, int):
            end = positions + q.size(2)
        if end > self.cos.size(0):
            self._extend(end)
        if isinstance(positions, int):
            cos, sin = self.cos[positions:end], self.sin[positions:end]  # (L, Dh / 2)
        else:
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (B, 1, L, Dh / 2)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return f"d_head={self.d_head}"
