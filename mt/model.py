"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), Section 3.

The modules follow the paper's order: embeddings and positional encodings (3.4, 3.5), multi-head attention
(3.2), the position-wise feed-forward network (3.3), encoder and decoder layers and stacks (3.1), and the
model with its incremental decoder for search.

Shapes: batch B, source length S, target length T, model width D = d_model, heads H, head width D / H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mt.config import ModelConfig


def sinusoids(n_positions: int, d_model: int) -> Tensor:
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    Returns (n_positions, d_model) float32.
    """
    position = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    pe = torch.zeros(n_positions, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * inv_freq)
    pe[:, 1::2] = torch.cos(position * inv_freq)
    return pe.float()


class Embeddings(nn.Module):
    """Token embedding * sqrt(d_model) + sinusoidal position, then dropout (Sections 3.4, 3.5, 5.4)."""

    def __init__(self, vocab_size: int, d_model: int, dropout: float, pad_id: int, max_positions: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.scale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoids(max_positions, d_model), persistent=False)

    def positions(self, start: int, length: int) -> Tensor:
        """(length, D) encodings of positions start..start+length-1; the table grows for long inputs."""
        if start + length > self.pe.size(0):
            # Sinusoids extrapolate, so a sentence longer than any seen in training is still encoded.
            n = max(start + length, 2 * self.pe.size(0))
            self.pe = sinusoids(n, self.pe.size(1)).to(self.pe.device)
        return self.pe[start:start + length]

    def forward(self, tokens: Tensor, start: int = 0) -> Tensor:
        """tokens (B, L) -> (B, L, D)."""
        x = self.embed(tokens) * self.scale + self.positions(start, tokens.size(1)).to(self.embed.weight.dtype)
        return self.dropout(x)


class MultiHeadAttention(nn.Module):
    """Section 3.2.2, computed by `scaled_dot_product_attention`.

    Self-attention projects queries, keys and values with one fused matrix; cross-attention projects the
    queries alone and the memory's keys and values with another fused matrix, so a decoder can compute the
    latter once per sentence.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, cross: bool = False):
        super().__init__()
        self.n_heads, self.d_head, self.dropout = n_heads, d_model // n_heads, dropout
        self.cross = cross
        if cross:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def heads(self, x: Tensor) -> Tensor:
        """(B, L, H * Dh) -> (B, H, L, Dh)."""
        return x.unflatten(-1, (self.n_heads, self.d_head)).transpose(1, 2)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention: x (B, L, D) -> q, k, v, each (B, H, L, Dh)."""
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.heads(q), self.heads(k), self.heads(v)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention: memory (B, S, D) -> k, v, each (B, H, S, Dh)."""
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """q (B, H, Lq, Dh), k and v (B, H, Lk, Dh), mask broadcastable to (B, H, Lq, Lk), True where a query
        may attend -> (B, Lq, D)."""
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, memory: Tensor | None = None, mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        """x (B, L, D); memory (B, S, D) for cross-attention -> (B, L, D)."""
        if self.cross:
            k, v = self.project_kv(memory)
            return self.attend(self.heads(self.q_proj(x)), k, v, mask)
        q, k, v = self.project_qkv(x)
        return self.attend(q, k, v, mask, causal)


class FeedForward(nn.Module):
    """Section 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2."""

    def __init__(self, d_model: int, d_ff: int, activation_dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class Residual(nn.Module):
    """A sub-layer's residual connection and LayerNorm (Section 3.1), with dropout on the sub-layer's output
    (Section 5.4). Post-norm, the paper's: LayerNorm(x + Dropout(Sublayer(x))). Pre-norm:
    x + Dropout(Sublayer(LayerNorm(x))), which trains deep stacks without warmup tuning."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pre = cfg.norm == "pre"
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout)
        self.res_attn = Residual(cfg.d_model, cfg.dropout, pre)
        self.res_ffn = Residual(cfg.d_model, cfg.dropout, pre)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, S, D), mask (B, 1, 1, S) True at real tokens -> (B, S, D)."""
        x = self.res_attn(x, lambda y: self.self_attn(y, mask=mask))
        return self.res_ffn(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pre = cfg.norm == "pre"
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, cross=True)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout)
        self.res_self = Residual(cfg.d_model, cfg.dropout, pre)
        self.res_cross = Residual(cfg.d_model, cfg.dropout, pre)
        self.res_ffn = Residual(cfg.d_model, cfg.dropout, pre)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, D), memory (B, S, D), mask (B, 1, 1, S) -> (B, T, D), causal over T (Section 3.2.3)."""
        # Target padding sits at the end, so under the causal mask no real position ever sees it.
        x = self.res_self(x, lambda y: self.self_attn(y, causal=True))
        x = self.res_cross(x, lambda y: self.cross_attn(y, memory, mask))
        return self.res_ffn(x, self.ffn)

    def step(self, x: Tensor, cache: "LayerCache", step: int, mask: Tensor) -> Tensor:
        """One position: x (B, 1, D) -> (B, 1, D); appends this position's keys and values to `cache`."""
        def self_attention(y: Tensor) -> Tensor:
            q, k, v = self.self_attn.project_qkv(y)
            keys, values = cache.append(k, v, step)
            return self.self_attn.attend(q, keys, values)  # attends to positions 0..step: nothing to mask

        def cross_attention(y: Tensor) -> Tensor:
            q = self.cross_attn.heads(self.cross_attn.q_proj(y))
            return self.cross_attn.attend(q, cache.cross_k, cache.cross_v, mask)

        x = self.res_self(x, self_attention)
        x = self.res_cross(x, cross_attention)
        return self.res_ffn(x, self.ffn)


@dataclass
class LayerCache:
    """One decoder layer's state: cross-attention keys/values (fixed) and self-attention keys/values so far.

    The self-attention buffers have room for `capacity` positions and double when full, so appending costs
    amortised O(1) copies and `select` copies at most twice the filled part.
    """

    cross_k: Tensor  # (B, H, S, Dh)
    cross_v: Tensor
    self_k: Tensor  # (B, H, capacity, Dh)
    self_v: Tensor

    def append(self, k: Tensor, v: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """k, v (B, H, 1, Dh) at position `step` -> keys, values (B, H, step + 1, Dh)."""
        if step >= self.self_k.size(2):
            grow = torch.zeros_like(self.self_k)
            self.self_k = torch.cat([self.self_k, grow], dim=2)
            self.self_v = torch.cat([self.self_v, torch.zeros_like(self.self_v)], dim=2)
        self.self_k[:, :, step:step + 1] = k
        self.self_v[:, :, step:step + 1] = v
        return self.self_k[:, :, :step + 1], self.self_v[:, :, :step + 1]

    def select(self, index: Tensor) -> "LayerCache":
        return LayerCache(self.cross_k.index_select(0, index), self.cross_v.index_select(0, index),
                          self.self_k.index_select(0, index), self.self_v.index_select(0, index))


@dataclass
class DecoderState:
    """Everything the incremental decoder carries between steps for B rows (sentences x beams)."""

    memory: Tensor  # (B, S, D)
    src_pad: Tensor  # (B, S) bool, True at padding
    layers: list[LayerCache]
    step: int = 0  # tokens fed so far

    @property
    def cross_kv(self) -> list[tuple[Tensor, Tensor]]:
        return [(c.cross_k, c.cross_v) for c in self.layers]

    @property
    def self_kv(self) -> list[tuple[Tensor, Tensor]]:
        return [(c.self_k[:, :, :self.step], c.self_v[:, :, :self.step]) for c in self.layers]

    def select(self, index: Tensor) -> "DecoderState":
        """index (B',) long -> the state of rows index[0], index[1], ...: expands (repeat_interleave),
        reorders (beam origins) and prunes (finished sentences) in one call."""
        return DecoderState(self.memory.index_select(0, index), self.src_pad.index_select(0, index),
                            [c.select(index) for c in self.layers], self.step)


class Transformer(nn.Module):
    """The encoder-decoder of Section 3; `forward` returns logits (the loss lives in mt.train)."""

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, pad_id: int = 0,
                 share_all_embeddings: bool = False):
        super().__init__()
        if share_all_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError("share_all_embeddings needs one vocabulary for both sides")
        self.cfg, self.pad_id = cfg, pad_id
        d, drop = cfg.d_model, cfg.dropout
        self.src_embed = Embeddings(src_vocab_size, d, drop, pad_id, cfg.max_positions)
        self.tgt_embed = Embeddings(tgt_vocab_size, d, drop, pad_id, cfg.max_positions)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        # Pre-norm stacks end with a LayerNorm of their own (the residual stream is never normalised).
        self.encoder_norm = nn.LayerNorm(d) if cfg.norm == "pre" else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d) if cfg.norm == "pre" else nn.Identity()
        self.output = nn.Linear(d, tgt_vocab_size, bias=False)
        self.reset_parameters()
        # Section 3.4: "we share the same weight matrix between the two embedding layers and the pre-softmax
        # linear transformation" (the encoder's too when the vocabulary is joint).
        if share_all_embeddings:
            self.tgt_embed.embed.weight = self.src_embed.embed.weight
        if cfg.tie_embeddings or share_all_embeddings:
            self.output.weight = self.tgt_embed.embed.weight

    def reset_parameters(self) -> None:
        """Xavier-uniform weights (Glorot & Bengio, 2010), zero biases, a zero padding embedding."""
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
        with torch.no_grad():
            self.src_embed.embed.weight[self.pad_id].zero_()
            self.tgt_embed.embed.weight[self.pad_id].zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _run(self, layer: nn.Module, *args: Tensor) -> Tensor:
        if self.cfg.activation_checkpointing and self.training:
            # Recompute the layer's activations in the backward pass instead of storing them.
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, D), src_pad (B, S) bool, True at padding."""
        src_pad = src.eq(self.pad_id)
        mask = self.attention_mask(src_pad)
        x = self.src_embed(src)
        for layer in self.encoder:
            x = self._run(layer, x, mask)
        return self.encoder_norm(x), src_pad

    @staticmethod
    def attention_mask(src_pad: Tensor) -> Tensor:
        """src_pad (B, S) -> (B, 1, 1, S), True where attention is allowed (SDPA's boolean convention)."""
        return (~src_pad)[:, None, None, :]

    def decode(self, tgt_in: Tensor, memory: Tensor, src_pad: Tensor) -> Tensor:
        """tgt_in (B, T) (BOS + target), memory (B, S, D), src_pad (B, S) -> logits (B, T, V)."""
        mask = self.attention_mask(src_pad)
        x = self.tgt_embed(tgt_in)
        for layer in self.decoder:
            x = self._run(layer, x, memory, mask)
        return self.output(self.decoder_norm(x))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S), tgt_in (B, T) -> logits (B, T, V)."""
        memory, src_pad = self.encode(src)
        return self.decode(tgt_in, memory, src_pad)

    # ---- incremental decoding (fairseq-style): encode once, then one target position per call

    def start_decoding(self, src: Tensor, max_len: int | None = None) -> DecoderState:
        """src (B, S) -> the decoder's state before its first step (cross-attention keys/values computed
        here, once per sentence; self-attention buffers for `max_len` positions, grown on demand)."""
        memory, src_pad = self.encode(src)
        B = src.size(0)
        capacity = max(max_len or 16, 1)
        layers = []
        for layer in self.decoder:
            k, v = layer.cross_attn.project_kv(memory)
            empty = k.new_zeros(B, k.size(1), capacity, k.size(3))
            layers.append(LayerCache(k, v, empty, empty.clone()))
        return DecoderState(memory, src_pad, layers, 0)

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """tokens (B,): the token at position state.step (BOS first) -> logits (B, V) for the next one.
        Updates the state's caches in place and advances state.step."""
        x = self.tgt_embed(tokens.unsqueeze(1), start=state.step)
        mask = self.attention_mask(state.src_pad)
        for layer, cache in zip(self.decoder, state.layers):
            x = layer.step(x, cache, state.step, mask)
        state.step += 1
        return self.output(self.decoder_norm(x)).squeeze(1)
