"""What a training run measures between log lines, and the run's metrics file.

The sums stay on the device and are read once per log line, so that the training step never waits for it.
`metrics.jsonl` holds one JSON record per line: training records (`loss`, `nll`, `ppl`, `lr`, `tokens_per_s`,
`skipped_steps`), validation records (`valid_loss`, `valid_nll`, `valid_ppl`, `valid_bleu`) and, at each
start of `mt train`, a record of the hardware (`hardware`, `flops_per_token`, `peak_flops`), each with its
`step`. With `train.log_to: [tensorboard]` every record is mirrored into `RUN_DIR/tensorboard/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mt.errors import MTError


@dataclass
class Meter:
    """Training loss, NLL and target tokens since the last log line; the sums stay on the device."""

    loss: torch.Tensor
    nll: torch.Tensor
    tokens: int = 0
    seconds: float = 0.0  # training time only: validation and saving are left out of tokens/s

    def reset(self) -> None:
        self.loss.zero_()
        self.nll.zero_()
        self.tokens, self.seconds = 0, 0.0


@dataclass
class NonFinite:
    """Optimiser steps skipped for a non-finite gradient, counted on the device: in the current run of them,
    in the longest run so far, and since the last log line."""

    in_a_row: torch.Tensor
    longest: torch.Tensor
    since_log: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> "NonFinite":
        return cls(*(torch.zeros((), device=device) for _ in range(3)))

    def add(self, nonfinite: torch.Tensor) -> None:
        """nonfinite: () float, 1.0 for a skipped step, else 0.0."""
        self.in_a_row.add_(nonfinite).mul_(nonfinite)
        torch.maximum(self.longest, self.in_a_row, out=self.longest)
        self.since_log.add_(nonfinite)


@dataclass
class Clock:
    """This process's seconds spent per training step, validation and checkpoint: what a time budget's steps
    are estimated from."""

    steps: int = 0
    step_seconds: float = 0.0
    validations: int = 0
    validation_seconds: float = 0.0
    saves: int = 0
    save_seconds: float = 0.0

    def step(self, seconds: float) -> None:
        self.steps, self.step_seconds = self.steps + 1, self.step_seconds + seconds

    def validation(self, seconds: float) -> None:
        self.validations, self.validation_seconds = self.validations + 1, self.validation_seconds + seconds

    def save(self, seconds: float) -> None:
        self.saves, self.save_seconds = self.saves + 1, self.save_seconds + seconds

    def steps_that_fit(self, step: int, seconds_left: float, validate_every: int, save_every: int) -> int:
        """The step at which `seconds_left` run out, from step `step`, with a validation every
        `validate_every` steps and a checkpoint every `save_every`, each at its average cost so far."""
        per_step = self.seconds_per_step(validate_every, save_every)
        return step + max(0, int(seconds_left / max(per_step, 1e-9)))

    def seconds_per_step(self, validate_every: int, save_every: int) -> float:
        """A step's seconds with its share of the validations' and saves' seconds, at their averages so far."""
        per_step = self.step_seconds / max(self.steps, 1)
        if self.validations:
            per_step += self.validation_seconds / self.validations / validate_every
        if self.saves:
            per_step += self.save_seconds / self.saves / save_every
        return per_step


def append_record(path: Path, record: dict) -> None:
    """Add one record to a metrics.jsonl file (a whole line per write, so a killed run leaves whole lines)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file (metrics.jsonl, scores.jsonl), skipping a line cut short by a killed
    run; [] without the file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def tensorboard_writer(log_dir: Path, purge_step: int | None = None):
    """A `SummaryWriter` on `log_dir`. A resumed run passes `purge_step` (its first new step): TensorBoard then
    hides what the killed process logged from that step on, which the resumed one logs again."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MTError('train.log_to: tensorboard needs the tensorboard package: pip install -e ".[plot]"') from None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


def tensorboard_tag(record: dict[str, Any], key: str) -> str:
    """A record's key as a TensorBoard tag: train/loss, valid/loss, valid/bleu, run/peak_flops. The group keeps
    apart what two records of one step share (elapsed_s) and lets TensorBoard show each group as a section."""
    group = "valid" if "valid_loss" in record else "run" if "hardware" in record else "train"
    return f"{group}/{key.removeprefix('valid_')}"


def mirror_record(writer, record: dict[str, Any]) -> None:
    """Write a metrics.jsonl record's numbers as TensorBoard scalars (see `tensorboard_tag`), at its step."""
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(tensorboard_tag(record, key), value, record["step"])
    writer.flush()  # a line per log_every is rare enough, and a killed run keeps what it logged
