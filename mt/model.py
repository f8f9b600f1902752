"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), Section 3.

The code follows the paper's order: positional encodings and embeddings (3.5, 3.4), multi-head attention
(3.2), the position-wise feed-forward network (3.3), encoder and decoder layers and stacks (3.1), then the
model, with the incremental decoder that search runs one target position at a time (fairseq-style: the
cross-attention keys and values are computed once per sentence, the self-attention ones are cached).

Shapes: batch B, source length S, target length T, model width D = d_model, heads H, head width Dh = D / H,
vocabulary V. Attention masks follow `scaled_dot_product_attention`'s boolean convention: True = may attend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mt.config import ModelConfig
from mt.decoder_state import DecoderState, append_to_cache
from mt.errors import MTError
from mt.variants import Rotary, SwiGLU, make_norm

# Self-attention cache positions allocated by `start_decoding` when the caller gives no max_len; the cache
# doubles whenever it fills.
DEFAULT_CACHE_CAPACITY = 32


# --------------------------------------------------------------------------------------------------------
# Small pure functions


def sinusoids(n_positions: int, d_model: int) -> Tensor:
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    Returns (n_positions, d_model) float32. Computed in float64 so that large positions keep their precision.
    """
    position = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)  # (n, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (d_model / 2,)
    angle = position / 10000.0 ** (two_i / d_model)  # (n, d_model / 2)
    pe = torch.empty(n_positions, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe.float()


def padding_mask(pad: Tensor) -> Tensor:
    """pad (B, S) bool, True at padding -> (B, 1, 1, S) bool, True where attention is allowed.

    Broadcasts over heads and queries in `scaled_dot_product_attention`.
    """
    return (~pad)[:, None, None, :]


def train_flops_per_token(cfg: ModelConfig, tgt_vocab_size: int, src_len: int, tgt_len: int) -> float:
    """Model FLOPs of one training step (forward + backward) per target token, for MFU estimates.

    For a sentence pair of src_len source and tgt_len target positions (padded lengths for a padded batch:
    the kernels compute over padding too). Counts the matrix products only: a multiply-add is 2 FLOPs and
    the backward pass costs twice the forward (gradients for inputs and for weights). The attention scores
    and weighted sums count the full T x T matrix in decoder self-attention (as PaLM's appendix B does), so
    that the number does not depend on whether a kernel skips the masked half. Not counted: embedding
    look-ups, softmax, LayerNorm, biases, dropout, and the recomputation of activation checkpointing
    (hardware FLOPs, not model FLOPs). Multiply by the batch's B * T for the step's total.
    """
    d, S, T = cfg.d_model, src_len, tgt_len
    ffn = (3 if cfg.ffn == "swiglu" else 2) * d * cfg.ffn_width  # the FFN's matrices, per position
    if cfg.arch == "decoder_only":  # one stack over S + T positions, the output projection over T of them
        L = S + T
        stack = cfg.n_layers * (L * (4 * d * d + ffn) + 2 * L * L * d)
        return 3 * 2 * (stack + T * d * tgt_vocab_size) / T
    # Multiply-adds of one sentence pair's forward pass.
    encoder = cfg.n_layers * (S * (4 * d * d + ffn)  # Q, K, V, output projections; FFN
                              + 2 * S * S * d)  # scores Q K^T and the weighted sum of V
    decoder = cfg.decoder_layers * (T * (4 * d * d + ffn)  # self-attention projections; FFN
                                    + 2 * T * T * d  # self-attention scores and sum
                                    + T * 2 * d * d + S * 2 * d * d  # cross-attention: Q and output; K and V
                                    + 2 * T * S * d)  # cross-attention scores and sum
    output = T * d * tgt_vocab_size  # pre-softmax projection
    return 3 * 2 * (encoder + decoder + output) / T


# --------------------------------------------------------------------------------------------------------
# Sections 3.4, 3.5: embeddings and positional encodings


class Embeddings(nn.Module):
    """Token embedding * sqrt(d_model) (Section 3.4) + sinusoidal position (Section 3.5), then dropout on the
    sum (Section 5.4).

    ModelConfig.positions: "learned" adds a learned vector per position instead (Section 3.5's alternative,
    Table 3 row E), limited to max_positions; "rope" adds nothing here: positions enter self-attention
    (mt.variants.Rotary).
    """

    def __init__(self, vocab_size: int, d_model: int, dropout: float, pad_id: int, max_positions: int,
                 positions: str = "sinusoidal"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.scale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)
        self.kind = positions
        if positions == "sinusoidal":
            # Not persistent: it is a function of its shape, so checkpoints need not carry it.
            self.register_buffer("pe", sinusoids(max_positions, d_model), persistent=False)
        elif positions == "learned":
            self.learned = nn.Embedding(max_positions, d_model)

    def positions(self, start: int, length: int) -> Tensor:
        """The encodings of positions start .. start + length - 1: (length, D)."""
        if start + length > self.pe.size(0):
            self._extend(start + length)
        return self.pe[start:start + length]

    def _extend(self, n_positions: int) -> None:
        # Sinusoids extrapolate (Section 3.5), so an input longer than any seen in training is still encoded.
        # Doubling keeps a run of ever longer inputs from rebuilding the table each time. Built outside
        # inference mode: a table grown during search must still serve a later training step.
        n = max(n_positions, 2 * self.pe.size(0))
        with torch.inference_mode(False), torch.no_grad():
            self.pe = sinusoids(n, self.pe.size(1)).to(self.pe.device)

    def forward(self, tokens: Tensor, start: int | Tensor = 0, end: int = 0) -> Tensor:
        """tokens (B, L) long, at positions start .. start + L - 1, or at start (B, L) long, each row's own
        positions, all below `end` (known on the host) -> (B, L, D)."""
        x = self.embed(tokens) * self.scale
        if self.kind == "rope":
            return self.dropout(x)
        per_row = isinstance(start, Tensor)
        end = end if per_row else start + tokens.size(1)
        if self.kind == "learned":
            if end > self.learned.num_embeddings:
                raise MTError(f"an input of {end} positions is longer than the {self.learned.num_embeddings} "
                              "learned positions (model.max_positions) this model has")
            pe = self.learned(start) if per_row else self.learned.weight[start:end]
        elif per_row:
            if end > self.pe.size(0):
                self._extend(end)
            pe = self.pe[start]  # (B, L, D)
        else:
            pe = self.positions(start, tokens.size(1))
        return self.dropout(x + pe.to(x.dtype))


# --------------------------------------------------------------------------------------------------------
# Section 3.2: multi-head attention


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
                   dropout_p: float = 0.0) -> Tensor:
    """Equation 1, softmax(Q K^T / sqrt(d_k)) V, per head, with dropout on the probabilities (Section 5.4).

    q (B, H, Lq, Dh), k and v (B, H, Lk, Dh), mask broadcastable to (B, H, Lq, Lk), True where a query may
    attend; causal: query i sees keys 0..i (Section 3.2.3) -> (B, H, Lq, Dh).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


def attention_probabilities(q: Tensor, k: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """Equation 1's softmax(Q K^T / sqrt(d_k)) itself, for the callers that need to see it (attention maps,
    alignments): q (B, H, Lq, Dh), k (B, H, Lk, Dh), mask and causal as in `sdpa_attention` ->
    (B, H, Lq, Lk) float32, each row summing to 1."""
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


class MultiHeadAttention(nn.Module):
    """Section 3.2.2: h heads of Equation 1 over learned projections, concatenated and projected by W^O.

    Self-attention projects queries, keys and values with one fused matrix (one matrix product instead of
    three). Cross-attention projects the queries alone and the memory's keys and values with a second fused
    matrix, so the incremental decoder computes the latter once per sentence.
    """

    def __init__(self, d_model: int, n_heads: int, attention_dropout: float, cross: bool = False,
                 rope_positions: int = 0):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.dropout_p = attention_dropout  # on the attention probabilities, applied inside the kernel
        # Equation 1 itself; mt.fast.speed_up swaps in a faster kernel with the same arguments and result.
        self.kernel = sdpa_attention
        # Set by `attention_maps`: attend then computes the probabilities explicitly and keeps the last ones.
        self.keep_probabilities = False
        self.probabilities: Tensor | None = None  # (B, H, Lq, Lk) of the last call, when kept
        self.cross = cross
        if cross:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        # model.positions rope: self-attention rotates its queries and keys (a table of rope_positions to start).
        self.rotary = Rotary(self.d_head, rope_positions) if rope_positions and not cross else None

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, H, L, Dh)."""
        return x.unflatten(-1, (self.n_heads, self.d_head)).transpose(1, 2)

    def project_qkv(self, x: Tensor, positions: int | Tensor = 0, end: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention: x (B, L, D) -> q, k, v, each (B, H, L, Dh). With rotary embeddings, q and k are
        rotated to their positions: positions .. positions + L - 1, or positions (B, L) below `end` (see
        `Rotary`)."""
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions, end)
        return q, k, v

    def project_q(self, x: Tensor) -> Tensor:
        """Cross-attention queries: x (B, T, D) -> (B, H, T, Dh)."""
        return self.split_heads(self.q_proj(x))

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values: memory (B, S, D) -> k, v, each (B, H, S, Dh)."""
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """q (B, H, Lq, Dh), k and v (B, H, Lk, Dh), mask broadcastable to (B, H, Lq, Lk) -> (B, Lq, D).

        Heads are concatenated and projected by W^O (Section 3.2.2).
        """
        if self.keep_probabilities:
            self.probabilities = attention_probabilities(q, k, mask, causal)
            out = (self.probabilities.to(v.dtype) @ v)
        else:
            out = self.kernel(q, k, v, mask, causal, self.dropout_p if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel.__module__}.{self.kernel.__name__}"

    def attend_grouped(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor, group: int) -> Tensor:
        """Cross-attention of one target position for rows in groups of `group` consecutive rows that share a
        memory row (the beams of one sentence). x (B, 1, D); k, v (B / group, H, S, Dh); mask
        (B / group, 1, 1, S) -> (B, 1, D).

        A group's rows become `group` query positions of one attention over their sentence's keys and values,
        so beam search never copies those per beam: not when the beams are made, nor when they are reordered.
        """
        q = self.q_proj(x).view(-1, group, self.n_heads, self.d_head).transpose(1, 2)  # (B / group, H, group, Dh)
        return self.attend(q, k, v, mask).reshape(x.shape)  # (B / group, group, D) -> (B, 1, D)

    def forward(self, x: Tensor, memory: Tensor | None = None, mask: Tensor | None = None,
                causal: bool = False, positions: int | Tensor = 0, end: int = 0) -> Tensor:
        """x (B, L, D) queries; memory (B, S, D) for cross-attention (keys and values come from x otherwise);
        mask broadcastable to (B, H, L, S or L); positions and end: x's positions, for rotary embeddings (see
        `project_qkv`) -> (B, L, D)."""
        if self.cross:
            k, v = self.project_kv(memory)
            return self.attend(self.project_q(x), k, v, mask)
        q, k, v = self.project_qkv(x, positions, end)
        return self.attend(q, k, v, mask, causal)


# --------------------------------------------------------------------------------------------------------
# Sections 3.3 and 3.1: feed-forward network, residual connections, layers


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}  # GELU: Hendrycks & Gimpel (2016), exact (erf) form


class FeedForward(nn.Module):
    """Section 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2, with activation dropout after the ReLU (or GELU, with
    model.ffn gelu)."""

    def __init__(self, d_model: int, d_ff: int, activation_dropout: float, activation: str = "relu"):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(activation_dropout)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


def feed_forward(cfg: ModelConfig) -> nn.Module:
    """The position-wise network of ModelConfig.ffn: Section 3.3's (ReLU or GELU), or SwiGLU of width
    cfg.ffn_width."""
    if cfg.ffn == "swiglu":
        return SwiGLU(cfg.d_model, cfg.ffn_width, cfg.activation_dropout)
    return FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout, cfg.ffn)


class Residual(nn.Module):
    """A sub-layer's residual connection and LayerNorm (Section 3.1) with dropout on the sub-layer's output
    (Section 5.4).

    Post-norm, the paper's: LayerNorm(x + Dropout(Sublayer(x))). Pre-norm: x + Dropout(Sublayer(LayerNorm(x)))
    (Wang et al., 2019), which leaves the residual stream unnormalised and trains deep stacks more stably;
    rms_pre: the same with RMSNorm. `norm` is ModelConfig.norm.
    """

    def __init__(self, d_model: int, dropout: float, norm: str):
        super().__init__()
        self.norm = make_norm(norm, d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = norm != "post"

    def forward(self, x: Tensor, sublayer) -> Tensor:
        """x (B, L, D), sublayer: (B, L, D) -> (B, L, D) -> (B, L, D)."""
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


def rope_positions(cfg: ModelConfig) -> int:
    """The rotary table size self-attention starts with: max_positions with model.positions rope, else 0 (none)."""
    return cfg.max_positions if cfg.positions == "rope" else 0


def final_norm(cfg: ModelConfig) -> nn.Module:
    """The norm that ends a pre-norm stack (whose residual stream is never normalised); none for post-norm."""
    return nn.Identity() if cfg.norm == "post" else make_norm(cfg.norm, cfg.d_model)


class EncoderLayer(nn.Module):
    """Section 3.1: self-attention, then the feed-forward network, each inside a `Residual`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout,
                                            rope_positions=rope_positions(cfg))
        self.ffn = feed_forward(cfg)
        self.res_attn = Residual(cfg.d_model, cfg.dropout, cfg.norm)
        self.res_ffn = Residual(cfg.d_model, cfg.dropout, cfg.norm)

    def forward(self, x: Tensor, mask: Tensor, positions: int | Tensor = 0, end: int = 0) -> Tensor:
        """x (B, S, D), mask broadcastable to (B, 1, S, S) (`padding_mask`'s (B, 1, 1, S) here; the decoder-only
        stack's prefix mask there); positions and end: x's positions for rotary embeddings -> (B, S, D)."""
        x = self.res_attn(x, lambda y: self.self_attn(y, mask=mask, positions=positions, end=end))
        return self.res_ffn(x, self.ffn)


class DecoderLayer(nn.Module):
    """Section 3.1: masked self-attention, attention over the encoder's output, then the feed-forward network."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout,
                                            rope_positions=rope_positions(cfg))
        # Cross-attention stays unrotated: source and target positions are not on one axis.
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, cross=True)
        self.ffn = feed_forward(cfg)
        self.res_self = Residual(cfg.d_model, cfg.dropout, cfg.norm)
        self.res_cross = Residual(cfg.d_model, cfg.dropout, cfg.norm)
        self.res_ffn = Residual(cfg.d_model, cfg.dropout, cfg.norm)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, D), memory (B, S, D), mask (B, 1, 1, S) from `padding_mask` -> (B, T, D).

        Self-attention is causal (Section 3.2.3). Target padding sits at the end of each row, so under the
        causal mask no real position ever sees it and no padding mask is needed.
        """
        x = self.res_self(x, lambda y: self.self_attn(y, causal=True))
        x = self.res_cross(x, lambda y: self.cross_attn(y, memory, mask))
        return self.res_ffn(x, self.ffn)

    def step(self, x: Tensor, cache: tuple[Tensor, Tensor], cross_kv: tuple[Tensor, Tensor], position: int,
             mask: Tensor, group: int = 1) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One target position. x (B, 1, D) at `position`; cache: self-attention keys and values, each
        (B, H, capacity, Dh), filled for positions < position; cross_kv: each (B / group, H, S, Dh), shared by
        groups of `group` consecutive rows; mask (B / group, 1, 1, S) -> (B, 1, D) and the cache with this
        position's keys and values written (grown if it was full)."""
        def self_attention(y: Tensor) -> Tensor:
            nonlocal cache
            q, k, v = self.self_attn.project_qkv(y, position)  # rotary embeddings: this position's alone
            cache, keys, values = append_to_cache(cache, k, v, position)
            # Positions 0..position are all this query may see: the look-ahead mask has nothing left to hide.
            return self.self_attn.attend(q, keys, values)

        def cross_attention(y: Tensor) -> Tensor:
            return self.cross_attn.attend_grouped(y, *cross_kv, mask, group)

        x = self.res_self(x, self_attention)
        x = self.res_cross(x, cross_attention)
        return self.res_ffn(x, self.ffn), cache


# --------------------------------------------------------------------------------------------------------
# The model


class Stacks(nn.Module):
    """What the encoder-decoder and the decoder-only model (mt.decoder_only) share: initialisation, parameter
    and FLOP counts, activation checkpointing. A subclass sets cfg, pad_id, tgt_vocab_size and output, and
    names its token embeddings."""

    cfg: ModelConfig

    def embeddings(self) -> list[Embeddings]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Xavier-uniform weight matrices (Glorot & Bengio, 2010), zero biases, unit norm gains and zero
        padding embeddings, as The Annotated Transformer initialises the model. With cfg.embed_init "normal",
        the embeddings and the pre-softmax matrix are drawn from N(0, d_model^-0.5) instead, as fairseq does:
        scaled by sqrt(d_model) (Section 3.4), an embedding then has unit variance, like the sinusoids.

        A fused projection is initialised as the one matrix it is, as nn.MultiheadAttention does: each of
        W^Q, W^K, W^V gets a bound 1/sqrt(2) of its own Xavier bound, the scale fairseq gives its separate
        projections because it "observed the convergence to be much better".
        """
        for name, p in self.named_parameters():  # a shared matrix once
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:  # LayerNorm and RMSNorm gains
                nn.init.ones_(p)
        if self.cfg.embed_init == "normal":
            for matrix in [e.embed.weight for e in self.embeddings()] + [self.output.weight]:
                nn.init.normal_(matrix, mean=0.0, std=self.cfg.d_model ** -0.5)
        with torch.no_grad():
            for e in self.embeddings():
                e.embed.weight[self.pad_id].zero_()

    def num_parameters(self) -> int:
        """Trainable parameters, a shared matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, src_len: int, tgt_len: int) -> float:
        """Training FLOPs (forward + backward) per target token; see `train_flops_per_token`."""
        return train_flops_per_token(self.cfg, self.tgt_vocab_size, src_len, tgt_len)

    def _run(self, layer: nn.Module, *args) -> Tensor:
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            # Keep only the layer's input; recompute its activations in the backward pass.
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


class Transformer(Stacks):
    """The encoder-decoder of Section 3. `forward` returns logits; the loss lives in mt.loss.

    share_all_embeddings (a joint source-target vocabulary): one matrix for the source and the target
    embeddings. The target embedding is the pre-softmax projection when cfg.tie_embeddings (Section 3.4).
    """

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, pad_id: int = 0,
                 share_all_embeddings: bool = False):
        super().__init__()
        if share_all_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(f"share_all_embeddings needs one vocabulary, got sizes {src_vocab_size} and "
                             f"{tgt_vocab_size}")
        self.cfg, self.pad_id = cfg, pad_id
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        d = cfg.d_model
        self.src_embed = Embeddings(src_vocab_size, d, cfg.dropout, pad_id, cfg.max_positions, cfg.positions)
        self.tgt_embed = Embeddings(tgt_vocab_size, d, cfg.dropout, pad_id, cfg.max_positions, cfg.positions)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        # A pre-norm stack never normalises its residual stream, so it ends with a norm of its own.
        self.encoder_norm = final_norm(cfg)
        self.decoder_norm = final_norm(cfg)
        self.output = nn.Linear(d, tgt_vocab_size, bias=False)
        # Initialised before tying, so that a seed draws the same weights whichever matrices end up shared.
        self.reset_parameters()
        # Section 3.4: "we share the same weight matrix between the two embedding layers and the pre-softmax
        # linear transformation".
        if share_all_embeddings:
            self.tgt_embed.embed.weight = self.src_embed.embed.weight
        if cfg.tie_embeddings:
            self.output.weight = self.tgt_embed.embed.weight

    def embeddings(self) -> list[Embeddings]:
        return [self.src_embed, self.tgt_embed]

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) long -> memory (B, S, D), src_pad (B, S) bool, True at padding."""
        src_pad = src.eq(self.pad_id)
        mask = padding_mask(src_pad)
        x = self.src_embed(src)
        for layer in self.encoder:
            x = self._run(layer, x, mask)
        return self.encoder_norm(x), src_pad

    def decode(self, tgt_in: Tensor, memory: Tensor, src_pad: Tensor) -> Tensor:
        """Teacher-forced, causal decoder pass. tgt_in (B, T) long (BOS + target), memory (B, S, D),
        src_pad (B, S) bool -> logits (B, T, V). Rows at target padding are computed but meaningless."""
        mask = padding_mask(src_pad)
        x = self.tgt_embed(tgt_in)
        for layer in self.decoder:
            x = self._run(layer, x, memory, mask)
        return self.output(self.decoder_norm(x))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S) long, tgt_in (B, T) long (BOS + target) -> logits (B, T, V)."""
        memory, src_pad = self.encode(src)
        return self.decode(tgt_in, memory, src_pad)

    # ---- incremental decoding: encode once, then one target position per call (for search, under no_grad)

    def target_room(self, src: Tensor) -> int | None:
        """The most target tokens (EOS included) a search may produce for src (N, S): with learned positions,
        model.max_positions (the last token predicted is never fed back); None where positions never run out."""
        return self.cfg.max_positions if self.cfg.positions == "learned" else None

    def start_decoding(self, src: Tensor, max_len: int | None = None, beam_size: int = 1) -> DecoderState:
        """src (N, S) long -> the decoder's state before its first step, for B = N * beam_size rows (row
        n * beam_size + j decodes sentence n): the memory, its cross-attention keys and values (computed once
        here, one row per sentence), and empty self-attention caches with room for max_len positions
        (DEFAULT_CACHE_CAPACITY when None; they double when full)."""
        memory, src_pad = self.encode(src)
        capacity = max(max_len or DEFAULT_CACHE_CAPACITY, 1)
        cross_kv, self_kv = [], []
        for layer in self.decoder:
            k, v = layer.cross_attn.project_kv(memory)
            cross_kv.append((k, v))
            # Never read beyond `step`, so uninitialised memory is fine.
            shape = (src.size(0) * beam_size, k.size(1), capacity, k.size(3))
            self_kv.append((k.new_empty(shape), v.new_empty(shape)))
        return DecoderState(memory, src_pad, cross_kv, self_kv, 0, beam_size)

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """tokens (B,) long: the token at position state.step (BOS at step 0) -> logits (B, V) for the next
        position. Writes this position's self-attention keys and values into state.self_kv and advances
        state.step by one, in place."""
        x = self.tgt_embed(tokens.unsqueeze(1), start=state.step)  # (B, 1, D)
        mask = padding_mask(state.src_pad)
        for i, layer in enumerate(self.decoder):
            x, state.self_kv[i] = layer.step(x, state.self_kv[i], state.cross_kv[i], state.step, mask,
                                            state.group)
        state.step += 1
        return self.output(self.decoder_norm(x)).squeeze(1)


# --------------------------------------------------------------------------------------------------------
# Looking inside: attention maps


@dataclass
class AttentionMaps:
    """The attention probabilities of one teacher-forced pass, per layer, each (B, H, queries, keys) float32.

    encoder: (B, H, S, S) self-attention; decoder: (B, H, T, T) causal self-attention; cross: (B, H, T, S)
    attention of target positions (BOS + target) over the source. logits (B, T, V) of the same pass.
    """

    encoder: list[Tensor]
    decoder: list[Tensor]
    cross: list[Tensor]
    logits: Tensor


@torch.no_grad()
def attention_maps(model: Transformer, src: Tensor, tgt_in: Tensor) -> AttentionMaps:
    """Run `model.forward` (the code path training and scoring run; the incremental decoder computes the same
    probabilities) on src (B, S) and tgt_in (B, T) = BOS + target, keeping every attention module's
    probabilities. Dropout is off for the pass; the model's mode is restored after it. Encoder-decoder models
    only: a decoder-only model's one stack has no encoder, decoder and cross-attention maps to give."""
    if model.cfg.arch != "encoder_decoder":
        raise MTError(f"attention maps are for encoder-decoder models, not for {model.cfg.arch}")
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    training = model.training
    model.eval()
    for m in modules:
        m.keep_probabilities = True
    try:
        logits = model(src, tgt_in)
        return AttentionMaps(
            encoder=[layer.self_attn.probabilities for layer in model.encoder],
            decoder=[layer.self_attn.probabilities for layer in model.decoder],
            cross=[layer.cross_attn.probabilities for layer in model.decoder],
            logits=logits,
        )
    finally:
        for m in modules:
            m.keep_probabilities, m.probabilities = False, None
        model.train(training)
