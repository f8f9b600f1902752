"""Checkpoints: atomic saving, safe loading, rebuilding a model from a checkpoint alone, and averaging.

A checkpoint is a plain dict of tensors and primitive values, so it loads with `torch.load(weights_only=True)`
and runs no pickled code. It carries everything `translate` needs (the model's own config and vocabulary
sizes, the SentencePiece model bytes) and everything `train --resume` needs (optimiser, scaler, step, data
position, RNG states).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mt.config import Config, ModelConfig, from_dict, to_dict
from mt.data import PAD, Vocab
from mt.errors import MTError
from mt.io import atomic_open
from mt.fast import speed_up
from mt.decoder_only import DecoderOnlyTransformer
from mt.model import Transformer

log = logging.getLogger(__name__)

FORMAT = 1
STEP_FILE = re.compile(r"checkpoint_(\d+)\.pt$")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` through a temporary file, so a crash or a full disk never leaves a truncated
    checkpoint, nor touches the ones already written. A failed write is a one-line error naming the path and
    the free space."""
    path = Path(path)
    try:
        with atomic_open(path, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        raise MTError(f"{path}: could not write the checkpoint ({reason}; {free} on {path.parent}); "
                      "the checkpoints already written are intact") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MTError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise MTError(f"{path}: not a readable mt checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise MTError(f"{path}: not an mt checkpoint (format {FORMAT})")
    return state


def model_spec(cfg: ModelConfig, vocab: Vocab) -> dict[str, Any]:
    """The arguments that rebuild the network; stored in every checkpoint."""
    return {"cfg": to_dict(cfg), "src_vocab_size": vocab.src_size, "tgt_vocab_size": vocab.tgt_size,
            "pad_id": PAD, "share_all_embeddings": vocab.joint}


# model.arch -> the class that builds it; both take the same arguments and offer the same calls.
ARCHITECTURES = {"encoder_decoder": Transformer, "decoder_only": DecoderOnlyTransformer}


def build_model(spec: dict[str, Any], fast: bool = True) -> Transformer | DecoderOnlyTransformer:
    """The model `spec` describes, with mt.fast's kernels unless `fast` is False (the plain reference)."""
    cfg = from_dict(ModelConfig, spec["cfg"], "<checkpoint>")
    if cfg.ffn == "swiglu" and cfg.swiglu_d_ff is None:
        log.info("model.ffn swiglu: hidden width %d, 2/3 of d_ff %d rounded to a multiple of 8, for the parameters "
                 "of the ReLU layer (model.swiglu_d_ff sets another)", cfg.ffn_width, cfg.d_ff)
    model = ARCHITECTURES[cfg.arch](cfg, spec["src_vocab_size"], spec["tgt_vocab_size"], pad_id=spec["pad_id"],
                                    share_all_embeddings=spec["share_all_embeddings"])
    return speed_up(model) if fast else model


def count_parameters(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int | None = None,
                     joint: bool = True) -> int:
    """The trainable parameters of the model `cfg` describes (a shared matrix once), counted on the meta device:
    nothing is allocated or initialised, so a script can size a variant to a parameter budget (the ablation's
    rows within 5% of the paper's model) before training it."""
    spec = {"cfg": to_dict(cfg), "src_vocab_size": src_vocab_size,
            "tgt_vocab_size": src_vocab_size if tgt_vocab_size is None else tgt_vocab_size, "pad_id": PAD,
            "share_all_embeddings": joint}
    with torch.device("meta"):
        return build_model(spec, fast=False).num_parameters()


def vocab_state(vocab: Vocab) -> dict[str, Any]:
    return {"src": vocab.src_proto, "tgt": None if vocab.joint else vocab.tgt_proto, "identity": vocab.identity}


def load_for_inference(path: str | Path, fast: bool = True,
                       state: dict[str, Any] | None = None) -> tuple[Transformer, Vocab, Config]:
    """Rebuild the model (in eval mode; see `build_model` for `fast`), its vocabulary and its config from a
    checkpoint alone: the file at `path`, or its `state` where the caller has read it already."""
    state = load_checkpoint(path) if state is None else state
    model = build_model(state["model_spec"], fast)
    model.load_state_dict(state["model"])
    vocab = Vocab.from_protos(state["vocab"]["src"], state["vocab"]["tgt"])
    cfg = from_dict(Config, state["config"], str(path))
    return model.eval(), vocab, cfg


def model_spec_difference(saved: dict, spec: dict, where: str) -> str:
    """The first thing that differs between a checkpoint's model spec and the config's ("model.d_ff", say), or
    "". Keys added to ModelConfig since the checkpoint take their defaults, and `embed_init` is ignored: it
    shapes only the first step's weights."""
    cfg = to_dict(from_dict(ModelConfig, saved["cfg"], where))
    for key in sorted(set(cfg) | set(spec["cfg"])):
        if key != "embed_init" and cfg.get(key) != spec["cfg"].get(key):
            return f"model.{key} ({cfg.get(key)})"
    for key in sorted(set(saved) - {"cfg"} | set(spec) - {"cfg"}):
        if saved.get(key) != spec.get(key):
            return f"{key} ({saved.get(key)})"
    return ""


def save_run_checkpoint(run_dir: Path, step: int, state: dict[str, Any], best: bool = False,
                        last_only: bool = False, keep: int = 5) -> None:
    """checkpoint_<step>.pt, linked as checkpoint_last.pt (and checkpoint_best.pt), all but the newest `keep`
    step checkpoints pruned; with `last_only` (a preemption, off the save_every grid) checkpoint_last.pt alone,
    so that the step checkpoints, which `average_last` averages, stay those of an uninterrupted run. Any
    failure is a one-line MTError; the files already written stay intact."""
    step_path = Path(run_dir) / f"checkpoint_{step}.pt"
    if last_only:
        save_checkpoint(Path(run_dir) / "checkpoint_last.pt", state)
        return
    save_checkpoint(step_path, state)
    try:
        link_or_copy(step_path, Path(run_dir) / "checkpoint_last.pt")
        if best:
            link_or_copy(step_path, Path(run_dir) / "checkpoint_best.pt")
        prune_checkpoints(run_dir, keep)
    except OSError as e:
        raise MTError(f"{e.filename or step_path}: {e.strerror or e} while saving the checkpoint of step "
                      f"{step}") from None


def load_latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The state to resume `run_dir` from: checkpoint_last.pt, or where that is unreadable (a truncated copy,
    a disk error) the newest readable checkpoint_<step>.pt, with a warning."""
    last = Path(run_dir) / "checkpoint_last.pt"
    if not last.is_file():
        raise MTError(f"{last}: no checkpoint to resume from (train without --resume to start)")
    try:
        return last, load_checkpoint(last)
    except MTError as e:
        for path in reversed(step_checkpoints(run_dir)):
            try:
                state = load_checkpoint(path)
            except MTError:
                continue
            log.warning("%s; resuming from %s instead", e, path.name)
            return path, state
        raise MTError(f"{e}, and no readable checkpoint_<step>.pt beside it") from None


def remap_data_position(path: Path, epoch: int, batch: int, saved_world: int, world: int) -> int:
    """A checkpoint's data position `batch` in `epoch`, counted in groups of `saved_world` batches (one per
    process), as a position in groups of `world`; refused where no whole number of groups lands there (batches
    would be repeated or skipped)."""
    done = batch * saved_world  # batches of the epoch all processes have consumed
    if done % world:
        raise MTError(f"{path} was saved by {saved_world} processes after {done} batches of epoch {epoch}, which "
                      f"{world} processes cannot continue without repeating or skipping batches; resume with "
                      f"{saved_world} processes, or a number that divides {done}")
    return done // world


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The run's `checkpoint_<step>.pt` files, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint_*.pt") if (m := STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def last_checkpoints(run_dir: Path, n: int) -> list[Path]:
    paths = step_checkpoints(run_dir)
    if not paths:
        raise MTError(f"{run_dir}: no checkpoint_<step>.pt files to average")
    if n < 1:
        raise MTError(f"--last must be at least 1, got {n}")
    if n > len(paths):
        raise MTError(f"{run_dir}: --last {n} asks for more checkpoints than the {len(paths)} it has "
                      f"({', '.join(p.name for p in paths)})")
    return paths[-n:]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for path in step_checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` hold the same bytes as `src` atomically (a hard link when the file system allows)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def average_checkpoints(paths: list[Path], output: Path) -> None:
    """Average the parameters of `paths` (Section 6.1) into a checkpoint that `translate` can load.

    The average is taken in float64 and cast back, so the order of the files does not change the result
    beyond rounding; the last checkpoint's config and vocabulary go with it, and training state is dropped.
    """
    if not paths:
        raise MTError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    first = None
    for path in paths:
        state = load_checkpoint(path)
        if first is None:
            first = state
        elif state["model_spec"] != first["model_spec"]:
            raise MTError(f"{path}: a different model shape from {paths[0]}; only checkpoints of one run average")
        elif state["vocab"] != first["vocab"]:
            raise MTError(f"{path}: a different SentencePiece vocabulary from {paths[0]}; only checkpoints of one "
                          "run average")
        for k, v in state["model"].items():
            total[k] = total[k] + v.double() if k in total else v.double()
    last = state
    model = {k: (v / len(paths)).to(last["model"][k].dtype) for k, v in total.items()}
    save_checkpoint(output, {
        "model": model, "model_spec": last["model_spec"], "config": last["config"], "vocab": last["vocab"],
        "step": last.get("step"), "averaged": [str(p) for p in paths],
    })
