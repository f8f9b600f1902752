"""The Hugging Face format: a directory `MarianMTModel.from_pretrained` and `MarianTokenizer.from_pretrained`
load offline.

Marian's layers are mt's post-norm layers with separate Q, K and V projections, so most weights copy across.
The one difference is the sinusoids: mt interleaves them as Section 3.5 writes them (sin in even dimensions,
cos in odd ones), Marian puts all sines first and all cosines after. Permuting the model dimension, the
residual stream that embeddings, position encodings, LayerNorms and every projection into or out of it share,
turns one layout into the other exactly: dimension h of Marian's stream is dimension `perm[h]` of mt's
(`halves_order`). Attention heads and the feed-forward layer's inner dimension are untouched, and LayerNorm
is indifferent to the order of its dimensions, so the permuted model computes the same function.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from mt.config import Config
from mt.data import BOS, EOS, PAD, Vocab
from mt.export.weights import Attention, Linear, Norm, model_weights
from mt.model import Transformer

MAX_LENGTH = 512  # generate()'s default limit, as the opus-mt models set it


def halves_order(d_model: int) -> Tensor:
    """The permutation of the model dimension from mt's interleaved sinusoids to Marian's halves:
    (d_model,) long, [0, 2, 4, ..., 1, 3, 5, ...], so that `sinusoids(n, d)[:, perm]` is Marian's table."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def marian_state_dict(model: Transformer) -> dict[str, Tensor]:
    """mt's weights under MarianMTModel's names, the model dimension permuted by `halves_order`.

    A matrix that reads the residual stream has its input columns permuted; one that writes into it (an output
    projection, the second feed-forward layer) has its rows and bias permuted, as do LayerNorm gains and biases.
    """
    w = model_weights(model)
    perm = halves_order(model.cfg.d_model)
    state: dict[str, Tensor] = {}

    def reads(name: str, linear: Linear) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = linear.weight[:, perm], linear.bias

    def writes(name: str, linear: Linear) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = linear.weight[perm], linear.bias[perm]

    def norm(name: str, n: Norm) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = n.gain[perm], n.bias[perm]

    def attention(name: str, attn: Attention, norm_name: str) -> None:
        for proj in ("q", "k", "v"):
            reads(f"{name}.{proj}_proj", getattr(attn, proj))
        writes(f"{name}.out_proj", attn.out)
        norm(norm_name, attn.norm)

    for stack, layers in (("encoder", w.encoder), ("decoder", w.decoder)):
        for i, layer in enumerate(layers):
            prefix = f"model.{stack}.layers.{i}"
            attention(f"{prefix}.self_attn", layer.self_attn, f"{prefix}.self_attn_layer_norm")
            if layer.cross_attn is not None:
                attention(f"{prefix}.encoder_attn", layer.cross_attn, f"{prefix}.encoder_attn_layer_norm")
            reads(f"{prefix}.fc1", layer.ffn_in)
            writes(f"{prefix}.fc2", layer.ffn_out)
            norm(f"{prefix}.final_layer_norm", layer.ffn_norm)
    n_positions = model.cfg.max_positions
    state["model.encoder.embed_tokens.weight"] = w.src_embed[:, perm]
    state["model.decoder.embed_tokens.weight"] = w.tgt_embed[:, perm]
    state["model.encoder.embed_positions.weight"] = w.src_positions[:n_positions, perm]
    state["model.decoder.embed_positions.weight"] = w.tgt_positions[:n_positions, perm]
    state["lm_head.weight"] = w.output[:, perm]
    state["final_logits_bias"] = torch.zeros(1, model.tgt_vocab_size)
    return {k: v.float().contiguous().clone() for k, v in state.items()}


def marian_config(model: Transformer, cfg: Config):
    """The MarianConfig of `model`; `cfg` gives the languages and the search defaults."""
    from transformers import MarianConfig

    m = model.cfg
    joint = model.src_embed.embed.weight is model.tgt_embed.embed.weight
    return MarianConfig(
        vocab_size=model.src_vocab_size, decoder_vocab_size=model.tgt_vocab_size,
        share_encoder_decoder_embeddings=joint, tie_word_embeddings=m.tie_embeddings,
        d_model=m.d_model, encoder_layers=m.n_layers, decoder_layers=m.decoder_layers,
        encoder_attention_heads=m.n_heads, decoder_attention_heads=m.n_heads,
        encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff, activation_function="relu",
        max_position_embeddings=m.max_positions, scale_embedding=True,
        dropout=m.dropout, attention_dropout=m.attention_dropout, activation_dropout=m.activation_dropout,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, decoder_start_token_id=BOS,
        forced_eos_token_id=EOS, architectures=["MarianMTModel"],
    )


def write_hf(model: Transformer, vocab: Vocab, cfg: Config, out_dir: Path, quantization: str | None = None) -> None:
    """Write config.json, generation_config.json, model.safetensors and the MarianTokenizer files into
    `out_dir`, which holds source.spm and target.spm already; weights stored as float32, or as `quantization`
    (float16, bfloat16)."""
    import json
    import warnings

    from transformers import GenerationConfig, MarianMTModel, MarianTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one export, one line of output

    hf_model = MarianMTModel(marian_config(model, cfg)).eval()
    # Every Marian weight must come from mt (`model.shared` is an alias of the tied embeddings), and every mt
    # weight must land somewhere.
    missing, unexpected = hf_model.load_state_dict(marian_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith(("shared.weight",))]
    if missing or unexpected:
        raise RuntimeError(f"MarianMTModel weights not mapped: missing {missing}, unexpected {unexpected}")
    # mt never emits PAD and stops at EOS; the search defaults are the checkpoint's.
    hf_model.generation_config = GenerationConfig(
        decoder_start_token_id=BOS, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, forced_eos_token_id=EOS,
        bad_words_ids=[[PAD]], num_beams=cfg.decode.beam_size, max_length=MAX_LENGTH)
    if quantization:
        hf_model = hf_model.to(getattr(torch, quantization))
    hf_model.save_pretrained(out_dir)

    src_pieces = {vocab.src.id_to_piece(i): i for i in range(vocab.src_size)}
    (out_dir / "vocab.json").write_text(json.dumps(src_pieces, ensure_ascii=False), encoding="utf-8")
    extra = {}
    if not vocab.joint:
        tgt_pieces = {vocab.tgt.id_to_piece(i): i for i in range(vocab.tgt_size)}
        (out_dir / "target_vocab.json").write_text(json.dumps(tgt_pieces, ensure_ascii=False), encoding="utf-8")
        extra = {"target_vocab_file": str(out_dir / "target_vocab.json"), "separate_vocabs": True}
    with warnings.catch_warnings():  # its advice to install sacremoses, whose normalisation mt never applied
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        tokenizer = MarianTokenizer(str(out_dir / "source.spm"), str(out_dir / "target.spm"), str(out_dir / "vocab.json"),
                                    source_lang=cfg.data.src_lang, target_lang=cfg.data.tgt_lang,
                                    model_max_length=MAX_LENGTH, **extra)
    tokenizer.save_pretrained(out_dir)
