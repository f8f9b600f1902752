"""The one walk over a model's weights that the weight-copying formats (ct2, hf) share: every tensor under a
name that says what it does, not where mt keeps it. Fused projections are split (W^Q, W^K, W^V apart),
since one format fuses them differently from another.

Shapes: model width D, feed-forward width F, vocabularies Vs and Vt, positions P. A `Linear` is y = x W^T + b
with W (out, in), as torch stores it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from mt.model import Transformer


@dataclass
class Linear:
    weight: Tensor  # (out, in)
    bias: Tensor | None  # (out,)


@dataclass
class Norm:
    gain: Tensor  # (D,)
    bias: Tensor  # (D,)
    eps: float


@dataclass
class Attention:
    q: Linear  # (D, D) each
    k: Linear
    v: Linear
    out: Linear
    norm: Norm  # the sub-layer's LayerNorm: before it (pre-norm) or after the residual sum (post-norm)


@dataclass
class Layer:
    self_attn: Attention
    cross_attn: Attention | None  # decoder layers only
    ffn_in: Linear  # (F, D)
    ffn_out: Linear  # (D, F)
    ffn_norm: Norm


@dataclass
class Weights:
    pre_norm: bool
    src_embed: Tensor  # (Vs, D), scaled by sqrt(D) when used (Section 3.4)
    tgt_embed: Tensor  # (Vt, D); the same tensor as src_embed when the vocabulary is joint
    output: Tensor  # (Vt, D) the pre-softmax projection, no bias; tgt_embed itself when tied
    src_positions: Tensor  # (P, D) the sinusoids, interleaved as in Section 3.5
    tgt_positions: Tensor
    encoder: list[Layer]
    decoder: list[Layer]
    encoder_norm: Norm | None  # the final LayerNorm of a pre-norm stack
    decoder_norm: Norm | None


def _linear(layer: nn.Linear, rows: slice = slice(None)) -> Linear:
    return Linear(layer.weight[rows].detach(), None if layer.bias is None else layer.bias[rows].detach())


def _norm(norm: nn.LayerNorm) -> Norm:
    return Norm(norm.weight.detach(), norm.bias.detach(), norm.eps)


def _self_attention(attn, norm: nn.LayerNorm) -> Attention:
    d = attn.out_proj.weight.size(0)
    q, k, v = (_linear(attn.qkv_proj, slice(i * d, (i + 1) * d)) for i in range(3))
    return Attention(q, k, v, _linear(attn.out_proj), _norm(norm))


def _cross_attention(attn, norm: nn.LayerNorm) -> Attention:
    d = attn.out_proj.weight.size(0)
    k, v = (_linear(attn.kv_proj, slice(i * d, (i + 1) * d)) for i in range(2))
    return Attention(_linear(attn.q_proj), k, v, _linear(attn.out_proj), _norm(norm))


def model_weights(model: Transformer) -> Weights:
    """Every weight of `model`, named by role. Tensors are the model's own (detached), not copies."""
    pre = model.cfg.norm == "pre"
    encoder = [Layer(_self_attention(layer.self_attn, layer.res_attn.norm), None, _linear(layer.ffn.linear1),
                     _linear(layer.ffn.linear2), _norm(layer.res_ffn.norm)) for layer in model.encoder]
    decoder = [Layer(_self_attention(layer.self_attn, layer.res_self.norm),
                     _cross_attention(layer.cross_attn, layer.res_cross.norm), _linear(layer.ffn.linear1),
                     _linear(layer.ffn.linear2), _norm(layer.res_ffn.norm)) for layer in model.decoder]
    return Weights(
        pre_norm=pre, src_embed=model.src_embed.embed.weight.detach(), tgt_embed=model.tgt_embed.embed.weight.detach(),
        output=model.output.weight.detach(), src_positions=model.src_embed.pe, tgt_positions=model.tgt_embed.pe,
        encoder=encoder, decoder=decoder,
        encoder_norm=_norm(model.encoder_norm) if pre else None, decoder_norm=_norm(model.decoder_norm) if pre else None)
