"""The decoder-only variant (model.arch decoder_only): one stack of n_layers self-attention layers reads
`source EOS BOS target`, a prefix language model (Raffel et al., 2020, Section 3.2.1).

The separator is the EOS that mt already appends to every source sentence, followed by the BOS that starts every
target: no new vocabulary entry, and source and target arrive exactly as the encoder-decoder gets them. The
source positions attend to each other in both directions, the target positions to the whole source and
causally to the target; no source position sees the target. Positions count per row: a target token sits at
its row's source length + t wherever batch padding falls.

The model keeps the encoder-decoder's contracts, so training, the loss and search are unchanged:
`forward(src, tgt_in)` returns the logits of the target positions only (the loss stays on target tokens), and
`start_decoding` / `decode_step` / `DecoderState.select` are the incremental decoder: `start_decoding` runs
the source prefix once and writes its keys and values at the start of each layer's self-attention cache
(`DecoderState.offset` positions), copied to each of a sentence's beam rows when beam search widens the
state after its first step, so beam search reorders them like any cached position.

Shapes: batch B, source length S (padded), target length T, model width D, heads H, head width Dh,
vocabulary V.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mt.config import ModelConfig
from mt.decoder_state import DecoderState, append_to_cache
from mt.model import DEFAULT_CACHE_CAPACITY, Embeddings, EncoderLayer, Stacks, final_norm, padding_mask


def prefix_lm_mask(src_pad: Tensor, tgt_len: int) -> Tensor:
    """src_pad (B, S) bool, True at padding -> (B, 1, S + T, S + T) bool, True where query i may attend key j:
    every query sees the real source positions (both directions); a target query also sees the target
    positions up to its own (causal); no source query sees a target position. Target padding sits at the end
    of a row, so the causal part hides it from every real position."""
    batch, src_len = src_pad.shape
    length = src_len + tgt_len
    to_source = (~src_pad)[:, None, :].expand(batch, length, src_len)
    to_target = torch.zeros(length, tgt_len, dtype=torch.bool, device=src_pad.device)
    to_target[src_len:] = torch.ones(tgt_len, tgt_len, dtype=torch.bool, device=src_pad.device).tril()
    return torch.cat([to_source, to_target.expand(batch, length, tgt_len)], dim=2).unsqueeze(1)


def sequence_positions(src_pad: Tensor, tgt_len: int) -> Tensor:
    """src_pad (B, S) bool -> (B, S + T) long: 0 .. S - 1 over the source (padding's are never attended), then
    n + t for target position t of a row with n real source tokens."""
    batch, src_len = src_pad.shape
    source = torch.arange(src_len, device=src_pad.device).expand(batch, src_len)
    target = (~src_pad).sum(1, keepdim=True) + torch.arange(tgt_len, device=src_pad.device)
    return torch.cat([source, target], dim=1)


class DecoderOnlyTransformer(Stacks):
    """One stack over `source EOS BOS target` (see the module docstring). Its layers are the encoder's
    (self-attention and the feed-forward network, each in a `Residual`), masked as a prefix LM; one embedding
    reads source and target (a joint vocabulary), and is the pre-softmax projection when cfg.tie_embeddings."""

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, pad_id: int = 0,
                 share_all_embeddings: bool = False):
        super().__init__()
        if not share_all_embeddings or src_vocab_size != tgt_vocab_size:
            raise ValueError("a decoder-only model reads source and target with one embedding: it needs a joint "
                             f"vocabulary, got sizes {src_vocab_size} and {tgt_vocab_size}")
        self.cfg, self.pad_id = cfg, pad_id
        self.src_vocab_size = self.tgt_vocab_size = tgt_vocab_size
        d = cfg.d_model
        self.embed = Embeddings(tgt_vocab_size, d, cfg.dropout, pad_id, cfg.max_positions, cfg.positions)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.final_norm = final_norm(cfg)
        self.output = nn.Linear(d, tgt_vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.output.weight = self.embed.embed.weight

    def embeddings(self) -> list[Embeddings]:
        return [self.embed]

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S) long (ending in EOS, the separator), tgt_in (B, T) long (BOS + target) -> logits (B, T, V)
        of the target positions alone, so that the loss falls on target tokens only."""
        src_pad = src.eq(self.pad_id)
        src_len, length = src.size(1), src.size(1) + tgt_in.size(1)
        positions = sequence_positions(src_pad, tgt_in.size(1))
        x = self.embed(torch.cat([src, tgt_in], dim=1), positions, end=length)
        mask = prefix_lm_mask(src_pad, tgt_in.size(1))
        for layer in self.layers:
            x = self._run(layer, x, mask, positions, length)
        return self.output(self.final_norm(x[:, src_len:]))

    # ---- incremental decoding: the source prefix once, then one target position per call

    def target_room(self, src: Tensor) -> int | None:
        """As `Transformer.target_room`; the source prefix (padded to S) takes positions too."""
        return self.cfg.max_positions - src.size(1) if self.cfg.positions == "learned" else None

    def start_decoding(self, src: Tensor, max_len: int | None = None, beam_size: int = 1) -> DecoderState:
        """src (N, S) long -> the state before the first target step, for B = N * beam_size rows (row
        n * beam_size + j decodes sentence n): each layer's self-attention cache holds the source's keys and
        values at positions 0 .. S - 1 (state.offset = S), one copy per row, and room for max_len target
        positions (DEFAULT_CACHE_CAPACITY when None; it doubles when full). memory is the last layer's output
        over the source; there is no cross-attention."""
        src_pad = src.eq(self.pad_id)
        src_len = src.size(1)
        mask = padding_mask(src_pad)  # the prefix mask's source block: real source keys, both directions
        capacity = src_len + max(max_len or DEFAULT_CACHE_CAPACITY, 1)
        x = self.embed(src)
        self_kv = []
        for layer in self.layers:
            def self_attention(y: Tensor) -> Tensor:
                q, k, v = layer.self_attn.project_qkv(y)
                shape = (src.size(0) * beam_size, k.size(1), capacity, k.size(3))
                cache = k.new_empty(shape), v.new_empty(shape)  # beyond the source: written before it is read
                cache[0][:, :, :src_len] = k.repeat_interleave(beam_size, dim=0)
                cache[1][:, :, :src_len] = v.repeat_interleave(beam_size, dim=0)
                self_kv.append(cache)
                return layer.self_attn.attend(q, k, v, mask)

            x = layer.res_attn(x, self_attention)
            x = layer.res_ffn(x, layer.ffn)
        return DecoderState(x, src_pad, [], self_kv, 0, beam_size, offset=src_len)

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """tokens (B,) long: the token at target position state.step (BOS at step 0) -> logits (B, V) for the
        next position. Writes this position's keys and values into the caches at offset + step and advances
        state.step by one, in place."""
        src_pad = state.src_pad if state.group == 1 else state.src_pad.repeat_interleave(state.group, dim=0)
        at = state.offset + state.step  # the cache slot; the position is the row's own source length + step
        positions = (~src_pad).sum(1, keepdim=True) + state.step  # (B, 1)
        x = self.embed(tokens.unsqueeze(1), positions, end=at + 1)  # (B, 1, D)
        # Real source positions, then the target positions so far, this one included.
        mask = torch.cat([~src_pad, src_pad.new_ones(src_pad.size(0), state.step + 1)], dim=1)[:, None, None, :]
        for i, layer in enumerate(self.layers):
            def self_attention(y: Tensor) -> Tensor:
                q, k, v = layer.self_attn.project_qkv(y, positions, at + 1)  # rotary: this position's alone
                state.self_kv[i], keys, values = append_to_cache(state.self_kv[i], k, v, at)
                return layer.self_attn.attend(q, keys, values, mask)

            x = layer.res_attn(x, self_attention)
            x = layer.res_ffn(x, layer.ffn)
        state.step += 1
        return self.output(self.final_norm(x)).squeeze(1)
