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
from torch import Tensor

from mt.data import BOS, EOS, UNK, Vocab
from mt.export.weights import Attention, Layer, Linear, Norm, model_weights
from mt.model import Transformer


def _array(*tensors: Tensor) -> np.ndarray:
    """float32 numpy, several tensors concatenated along their first dimension (a fused projection)."""
    return np.concatenate([t.detach().float().cpu().numpy() for t in tensors])


def _linear(spec, *parts: Linear) -> None:
    """One CTranslate2 linear layer from one or several (fused, stacked by output rows) of ours."""
    spec.weight = _array(*(p.weight for p in parts))
    if parts[0].bias is not None:
        spec.bias = _array(*(p.bias for p in parts))


def _norm(spec, norm: Norm) -> None:
    spec.gamma, spec.beta = _array(norm.gain), _array(norm.bias)


def _attention(spec, attn: Attention, cross: bool) -> None:
    if cross:  # query, then keys and values fused, then the output projection
        _linear(spec.linear[0], attn.q)
        _linear(spec.linear[1], attn.k, attn.v)
    else:  # queries, keys and values fused, then the output projection
        _linear(spec.linear[0], attn.q, attn.k, attn.v)
    _linear(spec.linear[-1], attn.out)
    _norm(spec.layer_norm, attn.norm)


def _layer(spec, layer: Layer) -> None:
    _attention(spec.self_attention, layer.self_attn, cross=False)
    if layer.cross_attn is not None:
        _attention(spec.attention, layer.cross_attn, cross=True)
    _linear(spec.ffn.linear_0, layer.ffn_in)
    _linear(spec.ffn.linear_1, layer.ffn_out)
    _norm(spec.ffn.layer_norm, layer.ffn_norm)


def transformer_spec(model: Transformer, vocab: Vocab):
    """The model as a ctranslate2.specs.TransformerSpec, vocabularies registered, ready to validate and save."""
    from ctranslate2.specs import TransformerSpec, common_spec

    w = model_weights(model)
    spec = TransformerSpec.from_config((len(w.encoder), len(w.decoder)), model.cfg.n_heads, pre_norm=w.pre_norm,
                                       activation=common_spec.Activation.RELU)
    spec.config.layer_norm_epsilon = w.encoder[0].ffn_norm.eps
    spec.config.add_source_eos = True
    spec.config.unk_token = vocab.src.id_to_piece(UNK)
    spec.config.bos_token = spec.config.decoder_start_token = vocab.tgt.id_to_piece(BOS)
    spec.config.eos_token = vocab.tgt.id_to_piece(EOS)

    encoder, decoder = spec.encoder, spec.decoder
    encoder.embeddings[0].weight = _array(w.src_embed)
    decoder.embeddings.weight = _array(w.tgt_embed)
    encoder.position_encodings.encodings = _array(w.src_positions)
    decoder.position_encodings.encodings = _array(w.tgt_positions)
    for layer_spec, layer in zip(encoder.layer, w.encoder):
        _layer(layer_spec, layer)
    for layer_spec, layer in zip(decoder.layer, w.decoder):
        _layer(layer_spec, layer)
    if w.pre_norm:
        _norm(encoder.layer_norm, w.encoder_norm)
        _norm(decoder.layer_norm, w.decoder_norm)
    decoder.projection.weight = _array(w.output)

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
