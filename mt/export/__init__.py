"""`mt export`: a checkpoint leaves mt as a CTranslate2 model, a Hugging Face Marian model or ONNX graphs.

    weights.py  the one walk over a model's weights, each named by its role, that ct2 and hf share
    ct2.py      a ctranslate2 TransformerSpec filled from the weights, optionally quantized by CTranslate2
    hf.py       MarianMTModel and MarianTokenizer files (the model dimension permuted to Marian's sinusoids)
    onnx.py     the encoder and one decoder step as graphs of the model's own modules, for onnxruntime
    card.py     the README.md model card every export directory carries

Each format is written into a temporary directory beside the output and renamed into place once complete,
so a failure (a missing package, an architecture the format cannot express, a full disk) leaves nothing
behind. Every directory also holds the SentencePiece models as source.spm and target.spm.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mt.checkpoint import load_checkpoint, load_for_inference
from mt.config import ModelConfig
from mt.errors import MTError
from mt.io import cannot_write

FORMATS = ("ct2", "hf", "onnx")

# What each format can store the weights as; None is float32 everywhere.
QUANTIZATIONS = {
    "ct2": ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16"),
    "hf": ("float16", "bfloat16"),
    "onnx": ("int8",),
}

# The Python packages each format needs (the `export` extra), by import name and pip name.
PACKAGES = {
    "ct2": (("ctranslate2", "ctranslate2"),),
    "hf": (("transformers", "transformers"), ("safetensors", "safetensors")),
    "onnx": (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")),
}

# The model settings each format can express, as (config key, values it can express); any other value is
# refused in one line. Only what tests/test_export*.py checks against mt is claimed: the paper's model, and
# pre-norm where CTranslate2 and the ONNX graphs have it (MarianMTModel has post-norm layers only). RMSNorm,
# GELU, SwiGLU, learned or rotary positions and the decoder-only stack are refused everywhere.
_VARIANTS = (("ffn", ("relu",)), ("positions", ("sinusoidal",)), ("arch", ("encoder_decoder",)))
EXPRESSIBLE = {
    "ct2": (("norm", ("post", "pre")), *_VARIANTS),
    "hf": (("norm", ("post",)), *_VARIANTS),
    "onnx": (("norm", ("post", "pre")), *_VARIANTS),
}


def require(fmt: str, modules: tuple[str, ...] | None = None) -> None:
    """Stop with one line naming the `pip install` when a package `fmt` needs (of `modules`, where given) is
    missing."""
    for module, package in PACKAGES[fmt]:
        if modules is not None and module not in modules:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            raise MTError(f"the {fmt} format needs {package}: pip install -e \".[export]\" "
                          f"(or pip install {' '.join(p for _, p in PACKAGES[fmt])})") from None


def inexpressible(fmt: str, cfg: ModelConfig) -> str:
    """The first model setting `fmt` cannot express ("model.norm: pre"), or ""."""
    for key, allowed in EXPRESSIBLE.get(fmt, ()):
        if getattr(cfg, key) not in allowed:
            return f"model.{key}: {getattr(cfg, key)}"
    return ""


@contextlib.contextmanager
def staging_directory(output: Path, force: bool) -> Iterator[Path]:
    """A temporary directory beside `output` that becomes `output` when the block succeeds and is removed
    when it fails. An existing `output` is replaced only with `force`, and only once the new one is complete."""
    if output.exists() and not force:
        raise MTError(f"{output}: already exists (use --force to replace it)")
    if output.exists() and not output.is_dir():
        raise MTError(f"{output}: exists and is not a directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    except OSError as e:
        raise cannot_write(output, e) from None
    try:
        yield tmp
        if output.exists():
            old = tmp.with_suffix(".old")
            output.rename(old)
            try:
                tmp.rename(output)
            except BaseException:  # the old export goes back where it was
                old.rename(output)
                raise
            shutil.rmtree(old, ignore_errors=True)  # the new one is in place: a leftover is harmless
        else:
            tmp.rename(output)
    except OSError as e:  # a full disk, a permission: the user's to fix
        shutil.rmtree(tmp, ignore_errors=True)
        raise MTError(f"{output}: the export failed ({e.strerror or e}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(checkpoint: str | Path, fmt: str, output: str | Path, quantization: str | None = None,
           force: bool = False, command: str = "") -> Path:
    """Export `checkpoint` to `output` in format `fmt` (see FORMATS); returns the output directory.

    `command` (the command line that made it) goes into the model card.
    """
    if fmt not in FORMATS:
        raise MTError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if quantization is not None and quantization not in QUANTIZATIONS[fmt]:
        raise MTError(f"--quantization {quantization}: the {fmt} format offers "
                      f"{', '.join(QUANTIZATIONS[fmt])} (or none, float32)")
    require(fmt)  # before the checkpoint is read: a missing package fails fast
    output = Path(output)
    state = load_checkpoint(checkpoint)
    model, vocab, cfg = load_for_inference(checkpoint, fast=False, state=state)
    if reason := inexpressible(fmt, model.cfg):
        raise MTError(f"{checkpoint}: {reason} cannot be expressed in the {fmt} format")
    from mt.export.card import model_card

    with staging_directory(output, force) as tmp:
        (tmp / "source.spm").write_bytes(vocab.src_proto)
        (tmp / "target.spm").write_bytes(vocab.tgt_proto)
        if fmt == "ct2":
            from mt.export.ct2 import write_ct2
            write_ct2(model, vocab, tmp, quantization)
        elif fmt == "hf":
            from mt.export.hf import write_hf
            write_hf(model, vocab, cfg, tmp, quantization)
        else:
            from mt.export.onnx import write_onnx
            write_onnx(model, tmp, quantization)
        (tmp / "README.md").write_text(model_card(Path(checkpoint), state, model, cfg, fmt, quantization, command),
                                       encoding="utf-8")
    return output
