"""What a training run measures between log lines, and the run's metrics file.

The sums stay on the device and are read once per log line, so that the training step never waits for it.
`metrics.jsonl` holds one JSON record per line: training records (`loss`, `nll`, `ppl`, `lr`, `tokens_per_s`,
`skipped_steps`) and validation records (`valid_loss`, `valid_nll`, `valid_ppl`, `valid_bleu`), each with its
`step`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


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


def append_record(path: Path, record: dict) -> None:
    """Add one record to a metrics.jsonl file (a whole line per write, so a killed run leaves whole lines)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
