"""The model as two ONNX graphs that onnxruntime runs without torch or mt: `write_onnx`, and `OnnxModel`, which
runs them behind the three calls mt.search makes (start_decoding, decode_step, state.select).

Shapes: rows B, source length S, decoder layers L (cfg.decoder_layers), heads H, head width Dh, positions
already decoded t, target vocabulary V.

encoder.onnx
    in:  src (B, S) int64: SentencePiece ids, then EOS, padded with PAD (as mt.translate feeds them)
    out: cross_keys, cross_values (L, B, H, S, Dh) float32: each decoder layer's cross-attention keys and
         values of the encoder's output (what `Transformer.start_decoding` computes)
         source_mask (B, S) bool: True at real (non-pad) tokens

decoder_step.onnx: one target position, at position t, for B rows
    in:  tokens (B,) int64: the token at position t (BOS at t = 0)
         self_keys, self_values (L, B, H, t, Dh) float32: the self-attention cache of positions 0 .. t-1
             (zero-length at t = 0); t is read from their shape
         cross_keys, cross_values (L, B, H, S, Dh), source_mask (B, S): the encoder's outputs, their rows
             repeated or picked by the caller (beams)
    out: log_probs (B, V) float32: log_softmax of the next position's logits
         new_self_keys, new_self_values (L, B, H, t + 1, Dh): the cache with position t appended
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mt.errors import MTError
from mt.model import Transformer, padding_mask

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder_step.onnx"


def _require_onnx(exporting: bool = False):
    """The onnxruntime module; MTError naming the install when a package is missing (onnxscript, which
    torch.onnx's exporter imports, only when exporting)."""
    from mt.export import require

    require("onnx", None if exporting else ("onnxruntime",))
    return importlib.import_module("onnxruntime")


# ---- the two graphs as torch modules over the model's own sub-modules


class EncoderGraph(nn.Module):
    """src (B, S) long -> cross_keys, cross_values (L, B, H, S, Dh), source_mask (B, S) bool."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        memory, src_pad = self.model.encode(src)
        keys, values = zip(*(layer.cross_attn.project_kv(memory) for layer in self.model.decoder))
        return torch.stack(keys), torch.stack(values), ~src_pad


class DecoderStepGraph(nn.Module):
    """One target position: `DecoderLayer.step`'s sub-layers with the cache concatenated along time instead of
    written into a preallocated buffer (an ONNX graph has no in-place state), and every row its own
    cross-attention row (group 1). Shapes as the module docstring's decoder_step.onnx."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, self_keys: Tensor, self_values: Tensor, cross_keys: Tensor,
                cross_values: Tensor, source_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        t = self_keys.size(3)
        x = model.tgt_embed(tokens.unsqueeze(1), start=t)  # (B, 1, D)
        mask = padding_mask(~source_mask)  # (B, 1, 1, S)
        new_keys, new_values = [], []
        for i, layer in enumerate(model.decoder):
            def self_attention(y: Tensor) -> Tensor:
                q, k, v = layer.self_attn.project_qkv(y)
                keys = torch.cat([self_keys[i], k], dim=2)  # (B, H, t + 1, Dh)
                values = torch.cat([self_values[i], v], dim=2)
                new_keys.append(keys)
                new_values.append(values)
                # Positions 0..t are all this query may see: no look-ahead mask needed.
                return layer.self_attn.attend(q, keys, values)

            def cross_attention(y: Tensor) -> Tensor:
                return layer.cross_attn.attend(layer.cross_attn.project_q(y), cross_keys[i], cross_values[i], mask)

            x = layer.res_self(x, self_attention)
            x = layer.res_cross(x, cross_attention)
            x = layer.res_ffn(x, layer.ffn)
        logits = model.output(model.decoder_norm(x)).squeeze(1)  # (B, V)
        return F.log_softmax(logits, dim=-1), torch.stack(new_keys), torch.stack(new_values)


# ---- writing


@contextlib.contextmanager
def _quiet_export():
    """Silence the exporter's known noise (missing torchvision ops, deprecations inside torch, axis renaming)
    for this call only; anything else still reaches the terminal."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used.*",
                                    category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, input_names: list[str],
            output_names: list[str], dynamic_shapes: tuple[dict, ...], max_positions: int) -> None:
    """One graph by torch.export (the dynamo exporter), weights inside the file, its position limit in the
    metadata so that OnnxModel can refuse longer inputs with a message instead of a broadcast error."""
    import onnx

    with _quiet_export(), torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=input_names,
                          output_names=output_names, dynamic_shapes=dynamic_shapes, external_data=False,
                          verbose=False)
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {"max_positions": str(max_positions)})
    onnx.save(graph, str(path))


def write_onnx(model: Transformer, out_dir: Path, quantization: str | None = None) -> None:
    """Write encoder.onnx and decoder_step.onnx (see the module docstring) into the existing directory
    out_dir. quantization "int8": onnxruntime's dynamic quantization, weights int8, activations quantized on
    the fly; None: float32."""
    from mt.export import QUANTIZATIONS

    if quantization is not None and quantization not in QUANTIZATIONS["onnx"]:
        raise MTError(f"unknown quantization {quantization!r} for the onnx format (choose from: "
                      f"{', '.join(QUANTIZATIONS['onnx'])})")
    _require_onnx(exporting=True)
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise MTError(f"{out_dir}: not a directory (the onnx export writes into an existing one)")
    was_training = model.training
    model.eval()
    try:
        _write_float32(model, out_dir)
    finally:
        model.train(was_training)
    if quantization == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for name in (ENCODER_FILE, DECODER_FILE):
            path = out_dir / name
            tmp = out_dir / (name + ".fp32")
            path.replace(tmp)
            try:
                with _quiet_quantization():
                    quantize_dynamic(tmp, path, weight_type=QuantType.QInt8)
            finally:
                tmp.unlink()


def _write_float32(model: Transformer, out_dir: Path) -> None:
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        raise MTError("the onnx export needs a float32 model on the CPU")
    # Sizes >= 2 everywhere: torch.export specialises a dimension whose example size is 0 or 1. Distinct
    # sizes keep it from guessing that two dimensions are equal.
    batch, src_len, cache_len = torch.export.Dim("batch"), torch.export.Dim("src_len"), torch.export.Dim("t")
    src = torch.full((2, 5), min(3, model.src_vocab_size - 1), dtype=torch.long)
    src[1, 3:] = model.pad_id
    encoder = EncoderGraph(model).eval()
    # The sinusoid tables as they are now are the graphs' constants: longer inputs cannot be encoded.
    src_positions = model.src_embed.pe.size(0)
    tgt_positions = model.tgt_embed.pe.size(0)
    _export(encoder, (src,), out_dir / ENCODER_FILE, ["src"], ["cross_keys", "cross_values", "source_mask"],
            ({0: batch, 1: src_len},), src_positions)
    with torch.no_grad():
        cross_keys, cross_values, source_mask = encoder(src)
    L, B, H, _, Dh = cross_keys.shape
    self_kv = torch.zeros(L, B, H, 3, Dh)
    tokens = torch.full((B,), min(2, model.tgt_vocab_size - 1), dtype=torch.long)
    cache = {1: batch, 3: cache_len}
    cross = {1: batch, 3: src_len}
    _export(DecoderStepGraph(model).eval(), (tokens, self_kv, self_kv.clone(), cross_keys, cross_values, source_mask),
            out_dir / DECODER_FILE,
            ["tokens", "self_keys", "self_values", "cross_keys", "cross_values", "source_mask"],
            ["log_probs", "new_self_keys", "new_self_values"],
            ({0: batch}, cache, cache, cross, cross, {0: batch, 1: src_len}), tgt_positions)


@contextlib.contextmanager
def _quiet_quantization():
    """quantize_dynamic logs advice to pre-process the graph (shape inference) through the root logger; the
    weights-only dynamic quantization here does not need it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ---- running


class OnnxDecoderState:
    """What decoder_step.onnx carries between steps for B rows, as numpy arrays: the self-attention cache
    (L, B, H, t, Dh) twice, and per row its cross-attention keys and values (L, B, H, S, Dh) and source mask
    (B, S). Rows come in groups of `group` (the beams of one sentence), as in mt.decoder_state.DecoderState;
    here each row holds its own copy of its sentence's cross-attention row, which decoder_step.onnx takes."""

    def __init__(self, self_keys: np.ndarray, self_values: np.ndarray, cross_keys: np.ndarray,
                 cross_values: np.ndarray, source_mask: np.ndarray, group: int):
        self.self_keys, self.self_values = self_keys, self_values
        self.cross_keys, self.cross_values, self.source_mask = cross_keys, cross_values, source_mask
        self.group = group

    @property
    def step(self) -> int:
        """Tokens fed so far."""
        return self.self_keys.shape[3]

    def select(self, index: Tensor, sentences: Tensor | None = None, group: int | None = None) -> "OnnxDecoderState":
        """A new state whose row i is this state's row index[i]: index (B',) long. `sentences` and `group` as in
        DecoderState.select: None with group > 1 keeps every sentence where it is, so index only reorders rows
        within their groups, whose cross-attention rows are equal: those need no copy."""
        rows = index.cpu().numpy()
        if sentences is None and self.group > 1:
            cross_keys, cross_values, source_mask = self.cross_keys, self.cross_values, self.source_mask
        else:
            # Row index[i]'s cross-attention row is its sentence's, whichever group it lands in.
            cross_keys, cross_values = self.cross_keys[:, rows], self.cross_values[:, rows]
            source_mask = self.source_mask[rows]
        return OnnxDecoderState(self.self_keys[:, rows], self.self_values[:, rows], cross_keys, cross_values,
                                source_mask, self.group if group is None else group)


class OnnxModel:
    """encoder.onnx and decoder_step.onnx behind the three calls mt.search makes (see its docstring), so that
    `greedy_search(OnnxModel(directory), src, ...)` and `beam_search` run unchanged. Torch tensors in and out,
    on the CPU."""

    def __init__(self, directory: str | Path, intra_op_num_threads: int | None = None):
        ort = _require_onnx()
        directory = Path(directory)
        options = ort.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        options.log_severity_level = 3  # errors only: no buffer-reuse notices on the terminal
        self.encoder, self.decoder = (
            ort.InferenceSession(str(directory / name), options, providers=["CPUExecutionProvider"])
            for name in (ENCODER_FILE, DECODER_FILE))
        self.max_src_positions = _max_positions(self.encoder)
        self.max_tgt_positions = _max_positions(self.decoder)

    def start_decoding(self, src: Tensor, max_len: int | None = None, beam_size: int = 1) -> OnnxDecoderState:
        """src (N, S) long -> the state before the first step for B = N * beam_size rows (row n * beam_size + j
        decodes sentence n). max_len is ignored: the cache grows by one position a step."""
        if src.size(1) > self.max_src_positions:
            raise MTError(f"a source of {src.size(1)} tokens is longer than the onnx graphs' "
                          f"{self.max_src_positions} positions")
        cross_keys, cross_values, source_mask = self.encoder.run(None, {"src": src.cpu().numpy()})
        if beam_size > 1:
            cross_keys, cross_values = (np.repeat(a, beam_size, axis=1) for a in (cross_keys, cross_values))
            source_mask = np.repeat(source_mask, beam_size, axis=0)
        L, B, H, _, Dh = cross_keys.shape
        empty = np.zeros((L, B, H, 0, Dh), dtype=np.float32)
        return OnnxDecoderState(empty, empty, cross_keys, cross_values, source_mask, beam_size)

    def decode_step(self, tokens: Tensor, state: OnnxDecoderState) -> Tensor:
        """tokens (B,) long at position state.step -> log-probabilities (B, V) float32 of the next position
        (log_softmax leaves them unchanged, so search may treat them as logits). Advances the state in place."""
        if state.step >= self.max_tgt_positions:
            raise MTError(f"the onnx decoder graph has {self.max_tgt_positions} target positions; decoding "
                          f"needs more")
        log_probs, state.self_keys, state.self_values = self.decoder.run(None, {
            "tokens": tokens.cpu().numpy(), "self_keys": state.self_keys, "self_values": state.self_values,
            "cross_keys": state.cross_keys, "cross_values": state.cross_values,
            "source_mask": state.source_mask})
        return torch.from_numpy(log_probs)


def _max_positions(session) -> int:
    return int(session.get_modelmeta().custom_metadata_map.get("max_positions", 2 ** 62))
