"""Pictures of runs: learning curves from metrics.jsonl, and attention maps from a checkpoint.

matplotlib is the `[plot]` extra, imported in `pyplot()` alone. The drawing functions return the Figure, so a
caller (or a test) can read the lines and panels back before `save_figure` writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mt.config import DecodeConfig
from mt.data import BOS, EOS, PAD, Vocab
from mt.errors import MTError
from mt.metrics import read_records
from mt.model import AttentionMaps, Transformer, attention_maps
from mt.translate import search

# Panels of the learning curves: (title, ((record key, line label), ...)); each is drawn against step and hours.
PANELS = (
    ("loss (label-smoothed)", (("loss", "train"), ("valid_loss", "dev"))),
    ("perplexity", (("ppl", "train"), ("valid_ppl", "dev"))),
    ("dev BLEU (greedy)", (("valid_bleu", "dev"),)),
    ("learning rate", (("lr", "train"),)),
    ("tokens/s", (("tokens_per_s", "train"),)),
)
FORMATS = (".png", ".svg", ".pdf")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or one line naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise MTError('drawing needs matplotlib: pip install -e ".[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, output: str | Path) -> Path:
    """Write `figure` as PNG, SVG or PDF (by the file's suffix) and free it."""
    output = Path(output)
    if output.suffix.lower() not in FORMATS:
        raise MTError(f"{output}: the picture's name must end in {', '.join(FORMATS)}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # Pillow's optimised PNG: about a fifth smaller, for pictures committed beside the code.
        png = {"pil_kwargs": {"optimize": True}} if output.suffix.lower() == ".png" else {}
        figure.savefig(output, dpi=figure.dpi, **png)
    except OSError as e:
        raise MTError(f"{output}: cannot write the picture ({e.strerror or e})") from None
    finally:
        pyplot().close(figure)
    return output


# --------------------------------------------------------------------------------------------------------
# Learning curves


@dataclass
class Curve:
    """One metric of one run: its values at `steps`, and at `hours` of training (0 where not recorded)."""

    steps: np.ndarray
    hours: np.ndarray
    values: np.ndarray


def run_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl, or one line saying why there are none."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise MTError(f"{run_dir}: not a run directory")
    if not path.is_file():
        raise MTError(f"{path}: not found (is {run_dir} a directory mt train wrote?)")
    records = [r for r in read_records(path) if isinstance(r.get("step"), int)]
    if not records:
        raise MTError(f"{path}: empty or unreadable (no JSON records with a step)")
    return records


def latest_records(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training and the validation records of a run, each in step order.

    A resumed run logs again the steps after its checkpoint that the killed process had logged: a step at or
    below one already seen drops the earlier records from that step on, as TensorBoard's purge does.
    """
    kept: dict[str, list[dict[str, Any]]] = {"train": [], "valid": []}
    for record in records:
        kind = "valid" if "valid_loss" in record else "train" if "loss" in record else None
        if kind is None:
            continue
        series = kept[kind]
        while series and series[-1]["step"] >= record["step"]:
            series.pop()
        series.append(record)
    return kept["train"], kept["valid"]


def run_curves(records: list[dict[str, Any]]) -> dict[str, Curve]:
    """Each metric of PANELS found in `records` (see `latest_records`), as a Curve."""
    kept = dict(zip(("train", "valid"), latest_records(records)))
    # Validation records before elapsed_s was logged take the training clock at their step.
    train_steps = np.array([r["step"] for r in kept["train"]], dtype=float)
    train_seconds = np.array([r.get("elapsed_s", np.nan) for r in kept["train"]], dtype=float)
    curves = {}
    for _, lines in PANELS:
        for key, _ in lines:
            series = [r for r in kept["valid" if key.startswith("valid_") else "train"] if key in r]
            if not series:
                continue
            steps = np.array([r["step"] for r in series], dtype=float)
            seconds = np.array([r.get("elapsed_s", np.nan) for r in series], dtype=float)
            if np.isnan(seconds).any() and len(train_steps):
                seconds = np.where(np.isnan(seconds), np.interp(steps, train_steps, train_seconds), seconds)
            curves[key] = Curve(steps, np.nan_to_num(seconds) / 3600, np.array([r[key] for r in series], float))
    return curves


def run_names(run_dirs: list[Path]) -> list[str]:
    """The legend's names: each directory's name, or its whole path where two names are the same."""
    names = [p.resolve().name for p in run_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in run_dirs]


def learning_curves(run_dirs: list[str | Path]):
    """A Figure of PANELS (rows) against step (left column) and training hours (right column), one line per
    run and metric, named '<run> <train|dev>' in each panel's legend. Each line's gid is 'run:key:step' or
    'run:key:hours', which SVG output keeps as the id of the line's group."""
    plt = pyplot()
    run_dirs = [Path(p) for p in run_dirs]
    runs = {name: run_curves(run_records(path)) for name, path in zip(run_names(run_dirs), run_dirs)}
    figure, axes = plt.subplots(len(PANELS), 2, figsize=(11, 2.4 * len(PANELS)), dpi=80, squeeze=False,
                                sharex="col")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (title, lines) in enumerate(PANELS):
        for column, axis in enumerate(("step", "hours")):
            ax = axes[row, column]
            for i, (name, curves) in enumerate(runs.items()):
                for key, label in lines:
                    if key not in curves:
                        continue
                    curve = curves[key]
                    dev = key.startswith("valid_")
                    ax.plot(curve.steps if axis == "step" else curve.hours, curve.values, label=f"{name} {label}",
                            color=colors[i % len(colors)], linestyle="--" if dev else "-", marker="o" if dev else None,
                            markersize=3, gid=f"{name}:{key}:{axis}")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            if title == "perplexity" and ax.lines:  # from thousands to single figures
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    axes[-1, 1].set_xlabel("hours of training")
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------------------------------------
# Attention maps


@dataclass
class AttentionPicture:
    """What `attention_figure` drew: the pieces on its axes, the maps (batch of one), and the panel of each
    (kind, layer, head), kind in encoder | decoder | cross, layers and heads counted from 0."""

    source: list[str]  # source pieces + EOS: the encoder's queries and keys, the cross-attention's keys
    target_in: list[str]  # BOS + target pieces: the decoder self-attention's queries and keys
    target_out: list[str]  # target pieces + EOS: what each decoder position predicts (cross-attention's rows)
    maps: AttentionMaps
    panels: dict[tuple[str, int, int], Any]


def attention_inputs(model: Transformer, vocab: Vocab, source: str, target: str | None,
                     decode: DecodeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """src (1, S) = source ids + EOS, and tgt_in (1, T) = BOS + target ids, the target given or, when None,
    the model's own translation by the configured search (`decode`)."""
    ids = vocab.src.encode(source)
    if not ids:
        raise MTError("--src is empty: nothing to attend to")
    src = torch.tensor([ids + [EOS]])
    if target is None:
        with torch.no_grad():
            out = search(model, src, decode)
        tgt = [t for t in out.tokens[0, 0].tolist() if t not in (PAD, EOS)]
    else:
        tgt = vocab.tgt.encode(target)
    return src, torch.tensor([[BOS] + tgt])


def attention_figure(model: Transformer, vocab: Vocab, src: torch.Tensor,
                     tgt_in: torch.Tensor) -> tuple[Any, AttentionPicture]:
    """A grid of every layer's and head's attention for one sentence pair, src (1, S) and tgt_in (1, T): rows
    are the encoder's layers, then the decoder's self-attention, then its cross-attention; columns are heads.
    The probabilities are those of `mt.model.attention_maps`: the forward pass the model trains and scores with.
    Returns the Figure and what it drew."""
    plt = pyplot()
    maps = attention_maps(model, src, tgt_in)
    source = [vocab.src.id_to_piece(i) for i in src[0].tolist()]
    target_in = [vocab.tgt.id_to_piece(i) for i in tgt_in[0].tolist()]
    picture = AttentionPicture(source, target_in, target_in[1:] + [vocab.tgt.id_to_piece(EOS)], maps, {})
    # Self-attention rows are labelled by the position's own token; cross-attention rows by the token the
    # position predicts, so that a row reads as what the model looked at to write that word.
    kinds = [("encoder", maps.encoder, source, source), ("decoder", maps.decoder, target_in, target_in),
             ("cross", maps.cross, picture.target_out, source)]
    rows = [(kind, layer, probabilities, queries, keys) for kind, layers, queries, keys in kinds
            for layer, probabilities in enumerate(layers)]
    heads = maps.encoder[0].size(1)
    longest = max(len(source), len(target_in))
    side = max(2.2, 0.16 * longest + 0.9)  # inches per panel: room for every piece's label
    figure, axes = plt.subplots(len(rows), heads, figsize=(side * heads, side * len(rows)), dpi=80,
                                squeeze=False)
    for r, (kind, layer, probabilities, queries, keys) in enumerate(rows):
        for head in range(heads):
            ax = axes[r, head]
            ax.imshow(probabilities[0, head].float().numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set_gid(f"{kind}:{layer}:{head}")
            ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=6)
            ax.set_yticks(range(len(queries)), queries, fontsize=6)
            ax.set_title(f"{kind} layer {layer + 1}, head {head + 1}", fontsize=8)
            picture.panels[(kind, layer, head)] = ax
    figure.tight_layout()
    return figure, picture
