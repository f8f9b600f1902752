"""The CTranslate2 format: a `ctranslate2.specs.TransformerSpec` filled from the model's weights.

mt's layers map one to one onto CTranslate2's Transformer: the fused self-attention projection is its
`linear[0]`, cross-attention's query and fused key-value projections its `linear[0]` and `linear[1]`, a
sub-layer's LayerNorm sits on the attention or feed-forward spec (before the sub-layer in pre-norm, after
the residual sum in post-norm). The model's own sinusoid table is written as the position encodings, since
CTranslate2's default table lays sines and cosines out in halves, not interleaved as Section 3.5 does.
mt appends EOS to every source sentence and starts the target with BOS; the config says so
(`add_source_eos`, `decoder_start_token`), so a user passes bare SentencePiece pieces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor, nn

from mt.data import BOS, EOS, UNK, Vocab
from mt.model import Transformer


def _array(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _linear(spec, layer: nn.Linear) -> None:
    spec.weight = _array(layer.weight)
    if layer.bias is not None:
        spec.bias = _array(layer.bias)


def _norm(spec, norm: nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _array(norm.weight), _array(norm.bias)


def transformer_spec(model: Transformer, vocab: Vocab):
    """The model as a ctranslate2.specs.TransformerSpec, vocabularies registered, ready to validate and save."""
    from ctranslate2.specs import TransformerSpec, common_spec

    cfg = model.cfg
    spec = TransformerSpec.from_config((cfg.n_layers, cfg.decoder_layers), cfg.n_heads, pre_norm=cfg.norm == "pre",
                                       activation=common_spec.Activation.RELU)
    spec.config.layer_norm_epsilon = model.encoder[0].res_attn.norm.eps
    spec.config.add_source_eos = True
    spec.config.unk_token = vocab.src.id_to_piece(UNK)
    spec.config.bos_token = spec.config.decoder_start_token = vocab.tgt.id_to_piece(BOS)
    spec.config.eos_token = vocab.tgt.id_to_piece(EOS)

    encoder, decoder = spec.encoder, spec.decoder
    encoder.embeddings[0].weight = _array(model.src_embed.embed.weight)
    decoder.embeddings.weight = _array(model.tgt_embed.embed.weight)
    encoder.position_encodings.encodings = _array(model.src_embed.pe)
    decoder.position_encodings.encodings = _array(model.tgt_embed.pe)
    for layer_spec, layer in zip(encoder.layer, model.encoder):
        _linear(layer_spec.self_attention.linear[0], layer.self_attn.qkv_proj)
        _linear(layer_spec.self_attention.linear[1], layer.self_attn.out_proj)
        _norm(layer_spec.self_attention.layer_norm, layer.res_attn.norm)
        _linear(layer_spec.ffn.linear_0, layer.ffn.linear1)
        _linear(layer_spec.ffn.linear_1, layer.ffn.linear2)
        _norm(layer_spec.ffn.layer_norm, layer.res_ffn.norm)
    for layer_spec, layer in zip(decoder.layer, model.decoder):
        _linear(layer_spec.self_attention.linear[0], layer.self_attn.qkv_proj)
        _linear(layer_spec.self_attention.linear[1], layer.self_attn.out_proj)
        _norm(layer_spec.self_attention.layer_norm, layer.res_self.norm)
        _linear(layer_spec.attention.linear[0], layer.cross_attn.q_proj)
        _linear(layer_spec.attention.linear[1], layer.cross_attn.kv_proj)
        _linear(layer_spec.attention.linear[2], layer.cross_attn.out_proj)
        _norm(layer_spec.attention.layer_norm, layer.res_cross.norm)
        _linear(layer_spec.ffn.linear_0, layer.ffn.linear1)
        _linear(layer_spec.ffn.linear_1, layer.ffn.linear2)
        _norm(layer_spec.ffn.layer_norm, layer.res_ffn.norm)
    if cfg.norm == "pre":
        _norm(encoder.layer_norm, model.encoder_norm)
        _norm(decoder.layer_norm, model.decoder_norm)
    _linear(decoder.projection, model.output)

    spec.register_source_vocabulary([vocab.src.id_to_piece(i) for i in range(vocab.src_size)])
    spec.register_target_vocabulary([vocab.tgt.id_to_piece(i) for i in range(vocab.tgt_size)])
    return spec


def write_ct2(model: Transformer, vocab: Vocab, out_dir: Path, quantization: str | None = None) -> None:
    """Write the CTranslate2 model directory (model.bin, config.json, vocabularies) into `out_dir`; weights
    stored as `quantization` (CTranslate2's names: int8, int8_float32, float16, ...) or float32."""
    spec = transformer_spec(model, vocab)
    spec.validate()
    spec.optimize(quantization=quantization)
    spec.save(str(out_dir))
