"""The training loop: the warmup schedule, gradient accumulation, validation, checkpoints.

One optimiser step consumes `update_freq` token batches (gradient accumulation), so a small device reaches
the paper's ~25k-token batches. The loop never synchronises with the device inside a step: losses are
accumulated as tensors and read (`.item()`) only when a line is logged.

A run killed and resumed with `--resume` ends with the same weights as an uninterrupted one: the checkpoint
holds the model, the optimiser, the scaler, the step, the RNG states and the data position (epoch, batch),
and the batch order is a pure function of (seed, epoch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mt.checkpoint import (average_checkpoints, build_model, link_or_copy, load_checkpoint, model_spec,
                           prune_checkpoints, save_checkpoint, step_checkpoints, vocab_state)
from mt.config import Config, TrainConfig, to_dict
from mt.data import Batch, PreparedData, iterate_batches
from mt.errors import MTError
from mt.loss import label_smoothed_loss
from mt.runtime import autocast, init_distributed, resolve_device, resolve_precision, rng_state, set_rng_state
from mt.validation import validate

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# The maths, as small pure functions.


def learning_rate(step: int, cfg: TrainConfig, d_model: int, done: float = 0.0) -> float:
    """The learning rate of optimiser step `step` (counted from 1).

    `inverse_sqrt`, Equation 3: lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), times
    `lr_scale`. With `peak_lr` set, the same curve is rescaled to reach `peak_lr` at step = warmup_steps, which
    is easier to tune for a small model than a multiplier on d_model^-0.5.

    `linear`: peak * min(step / warmup_steps, 1 - done), a linear warmup, then a straight line to zero at the
    end of the run. `done` in [0, 1] is the fraction of the run's budget spent, the larger of steps / max_steps
    and elapsed / max_time_minutes. A run cut short by a wall-time budget then ends annealed instead of at a
    high learning rate (Li et al., 2020, "Budgeted training"), and its last checkpoints are worth
    averaging. The peak is that of the inverse-sqrt curve (peak_lr, or lr_scale * (d_model * warmup_steps)^-0.5).
    """
    step, warmup = max(step, 1), cfg.warmup_steps
    peak = cfg.peak_lr if cfg.peak_lr is not None else cfg.lr_scale * (d_model * warmup) ** -0.5
    if cfg.lr_schedule == "linear":
        return peak * max(0.0, min(step / warmup, 1.0 - done))
    return peak * min(step ** -0.5, step * warmup ** -1.5) * warmup ** 0.5


# --------------------------------------------------------------------------------------------------------
# Set-up


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the paper's beta1 = 0.9, beta2 = 0.98, epsilon = 1e-9 (Section 5.3), fused where supported."""
    kwargs = dict(lr=0.0, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(model.parameters(), foreach=device.type == "cuda", **kwargs)


# --------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of `epoch` already consumed
    best: float | None = None  # best dev score so far (BLEU: higher is better; loss: lower is better)
    bad_validations: int = 0
    elapsed: float = 0.0  # training seconds before this process started


@dataclass
class TrainResult:
    run_dir: Path
    progress: Progress
    stop_reason: str
    last_valid: dict = field(default_factory=dict)
    averaged: Path | None = None

    def summary(self) -> list[str]:
        lines = [f"stopped after {self.progress.step} steps ({self.stop_reason})"]
        if self.last_valid:
            lines.append("last validation: " + ", ".join(f"{k} {v:.2f}" for k, v in self.last_valid.items()
                                                         if isinstance(v, float)))
        if self.progress.best is not None:
            lines.append(f"best dev score: {self.progress.best:.2f} -> {self.run_dir / 'checkpoint_best.pt'}")
        lines.append(f"last checkpoint: {self.run_dir / 'checkpoint_last.pt'}")
        if self.averaged:
            lines.append(f"averaged checkpoint: {self.averaged}")
        return lines


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


class Trainer:
    """Owns the model, optimiser and run directory of one training run."""

    def __init__(self, cfg: Config, data: PreparedData, resume: bool = False):
        self.cfg, self.data = cfg, data
        self.options = cfg.train
        self.run_dir = Path(cfg.run_dir)
        self.device = resolve_device(self.options.device)
        self.precision = resolve_precision(self.options.precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise MTError("train.precision fp16 needs a CUDA device; use bf16 on the CPU")
        if self.options.num_threads:
            torch.set_num_threads(self.options.num_threads)
        self.rank, self.world = init_distributed(self.device)
        self.main = self.rank == 0
        torch.manual_seed(self.options.seed)  # the same initial weights on every rank
        self.spec = model_spec(cfg.model, data.vocab)
        self.model = build_model(self.spec).to(self.device)
        torch.manual_seed(self.options.seed + self.rank)  # but different dropout masks
        # Train through the DDP / compiled wrappers but save the plain module's weights (their keys are prefixed).
        self.ddp: DistributedDataParallel | None = None
        self.step_model: torch.nn.Module = self.model
        if self.world > 1:
            # The only buffers are the sinusoid tables, the same on every rank: no broadcast before each forward.
            self.step_model = self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        if self.options.compile:
            self.step_model = torch.compile(self.step_model)
        self.optimizer = make_optimizer(self.model, self.options, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.progress = Progress()
        self.time_done, self.lr = 0.0, 0.0  # fit() keeps both up to date
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume:
            self._resume()
        log.info("model: %.1fM parameters on %s, %s%s", self.model.num_parameters() / 1e6, self.device,
                 self.precision + (" (auto)" if self.options.precision == "auto" else ""),
                 f", {self.world} processes" if self.world > 1 else "")

    # ---- checkpoints

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(), "model_spec": self.spec, "config": to_dict(self.cfg),
            "vocab": vocab_state(self.data.vocab), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "progress": vars(self.progress).copy(), "precision": self.precision,
            "rng": self._all_rng_states(), "step": self.progress.step,
        }

    def _all_rng_states(self) -> list[dict]:
        """Every rank's RNG state (a collective: all ranks call it), so a resumed run draws the same masks."""
        state = rng_state(self.device)
        if self.world == 1:
            return [state]
        states: list = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def save(self, best: bool = False) -> None:
        state = self._state()
        if not self.main:
            return
        step_path = self.run_dir / f"checkpoint_{self.progress.step}.pt"
        save_checkpoint(step_path, state)
        link_or_copy(step_path, self.run_dir / "checkpoint_last.pt")
        if best:
            link_or_copy(step_path, self.run_dir / "checkpoint_best.pt")
        prune_checkpoints(self.run_dir, self.options.keep_checkpoints)

    def _resume(self) -> None:
        path = self.run_dir / "checkpoint_last.pt"
        if not path.is_file():
            raise MTError(f"{path}: no checkpoint to resume from (train without --resume to start)")
        state = load_checkpoint(path)
        if state["model_spec"] != self.spec:
            raise MTError(f"{path}: the checkpoint's model or vocabulary differs from the config's; "
                          "resume with the config the run started with")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        if state.get("precision", self.precision) != self.precision:  # `auto` on another machine, say
            log.warning("%s was trained in %s, resuming in %s", path, state["precision"], self.precision)
        rngs = state["rng"]
        if len(rngs) != self.world:
            log.warning("%s was saved by %d processes, resuming with %d: dropout masks will differ from an "
                        "uninterrupted run", path, len(rngs), self.world)
        else:
            set_rng_state(rngs[self.rank], self.device)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.progress.step,
                 self.progress.epoch, self.progress.batch)

    # ---- batches

    def micro_batches(self) -> Iterator[tuple[Batch, int, int, int]]:
        """This rank's training batches across epochs: (batch, tokens of all ranks' batches at this position,
        and the (epoch, batch) position that follows it)."""
        epoch, start = self.progress.epoch, self.progress.batch
        while True:
            empty = True
            for position, batch, group_tokens in iterate_batches(
                    self.data.train, self.cfg.data.max_tokens, self.options.seed, epoch, start=start,
                    shard=(self.rank, self.world)):
                empty = False
                yield batch, group_tokens, epoch, position + 1
            if empty and start == 0:
                raise MTError(f"{self.cfg.data.train}: too few batches for {self.world} processes; "
                              "lower data.max_tokens")
            epoch, start = epoch + 1, 0

    def next_update(self, micro_batches: Iterator) -> tuple[list[Batch], int]:
        """The `update_freq` batches of the next optimiser step and the target tokens of all ranks' batches;
        advances the data position in `progress`."""
        batches, n_tokens = [], 0
        for _ in range(self.options.update_freq):
            batch, group_tokens, self.progress.epoch, self.progress.batch = next(micro_batches)
            batches.append(batch)
            n_tokens += group_tokens
        return batches, n_tokens

    # ---- one update

    def train_step(self, batches: list[Batch], n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over `update_freq` batches, then one optimiser step.

        The loss is normalised by `n_tokens`, the target tokens of the whole update across all ranks
        (known on the host from the batch order, so nothing waits for the device or the other ranks); DDP
        averages gradients over ranks, hence the factor `world`. Returns this rank's summed (loss, nll).
        """
        options = self.options
        self.step_model.train()
        total_loss = torch.zeros((), device=self.device)
        total_nll = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            # DDP all-reduces gradients on every backward unless told not to: only the last one needs it.
            last = i == len(batches) - 1
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                with autocast(self.precision, self.device):
                    logits = self.step_model(batch.src, batch.tgt_in)
                loss, nll = label_smoothed_loss(logits.flatten(0, 1), batch.tgt_out.flatten(), options.label_smoothing,
                                                exclude_pad=options.smoothing_excludes_pad, reuse_logits=True)
                self.scaler.scale(loss * (self.world / n_tokens)).backward()
            total_loss += loss.detach()
            total_nll += nll.detach()
        step = self.progress.step + 1
        done = max((step - 1) / options.max_steps, self.time_done)
        self.lr = learning_rate(step, options, self.cfg.model.d_model, done=done)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if options.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), options.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        return total_loss, total_nll

    # ---- validation

    def _improved(self, result: dict) -> bool:
        if self.options.best_metric == "bleu" and "valid_bleu" in result:
            score, better = result["valid_bleu"], lambda a, b: a > b
        elif "valid_loss" in result:
            score, better = result["valid_loss"], lambda a, b: a < b
        else:
            return False
        if self.progress.best is None or better(score, self.progress.best):
            self.progress.best, self.progress.bad_validations = score, 0
            return True
        self.progress.bad_validations += 1
        return False

    # ---- the loop

    def fit(self) -> TrainResult:
        """Train until a budget or patience runs out: each optimiser step is followed by logging, the time
        budget's check, validation and saving, each when it is due."""
        options, progress = self.options, self.progress
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.start_time, self.start_elapsed = time.time(), progress.elapsed
        self.time_budget = options.max_time_minutes * 60 if options.max_time_minutes else math.inf
        self.time_done = progress.elapsed / self.time_budget  # the budget's fraction spent (the same on all ranks)
        meter = Meter(torch.zeros((), device=self.device), torch.zeros((), device=self.device))
        last_valid: dict = {}
        stop = ""
        micro_batches = self.micro_batches()
        bar = tqdm(total=options.max_steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None if self.main else True, mininterval=1.0)
        while not stop:
            if progress.step >= options.max_steps:
                stop = f"max_steps {options.max_steps}"
                break
            started = time.time()
            batches, n_tokens = self.next_update(micro_batches)
            if options.max_epochs and progress.epoch >= options.max_epochs:
                stop = f"max_epochs {options.max_epochs}"
                break
            loss, nll = self.train_step(batches, n_tokens)
            meter.loss += loss
            meter.nll += nll
            meter.tokens += sum(b.n_tgt_tokens for b in batches)
            progress.elapsed = self.start_elapsed + time.time() - self.start_time
            bar.update(1)
            meter.seconds += time.time() - started
            if progress.step % options.log_every == 0:
                self.log_training(meter, bar)
            stop = self.time_budget_spent()
            best, stop = self.validate_if_due(stop, last_valid)
            if progress.step % options.save_every == 0 or best or stop or progress.step >= options.max_steps:
                self.save(best=best)
        bar.close()
        return self.finish(stop, last_valid)

    def log_training(self, meter: Meter, bar: tqdm) -> None:
        """One metrics.jsonl record, and the progress bar's figures (or a log line where there is no terminal)."""
        progress = self.progress
        record = {"step": progress.step, "epoch": progress.epoch, "loss": meter.loss.item() / meter.tokens,
                  "nll": meter.nll.item() / meter.tokens, "lr": self.lr,
                  "tokens_per_s": meter.tokens / max(meter.seconds, 1e-9), "elapsed_s": progress.elapsed}
        record["ppl"] = math.exp(min(record["nll"], 50.0))
        bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{record['ppl']:.1f}", lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_s']:.0f}")
        if bar.disable and self.main:  # a log file or a batch job: a line per log step instead
            log.info("step %d: loss %.3f, ppl %.1f, lr %.2e, %.0f tokens/s", progress.step, record["loss"],
                     record["ppl"], record["lr"], record["tokens_per_s"])
        self.log_metrics(record)
        meter.reset()

    def log_metrics(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def time_budget_spent(self) -> str:
        """The stop reason once `max_time_minutes` is spent, else "". Ranks see slightly different clocks:
        under torchrun rank 0's clock rules, read at log steps only (a collective), so that every rank stops
        at the same step and uses the same learning rate."""
        if self.world == 1 or self.progress.step % self.options.log_every == 0:
            self.time_done = self._from_rank0(self.progress.elapsed / self.time_budget)
            if self.time_done >= 1.0:
                return f"max_time_minutes {self.options.max_time_minutes:g}"
        return ""

    def validate_if_due(self, stop: str, last_valid: dict) -> tuple[bool, str]:
        """Validate every `validate_every` steps and before stopping; update `last_valid` in place. Returns
        whether the dev score improved and the stop reason, patience's included."""
        progress, options = self.progress, self.options
        if not (progress.step % options.validate_every == 0 or (stop and self.data.valid is not None)):
            return False, stop
        best = False
        if self.main:
            last_valid.clear()
            last_valid.update(validate(self.model, self.data, self.cfg, self.precision, self.device))
            best = self._improved(last_valid)
            self.log_metrics({"step": progress.step, **last_valid})
            log.info("step %d: %s", progress.step, ", ".join(f"{k} {v:.3f}" for k, v in last_valid.items()))
        if self._agree(bool(options.patience) and progress.bad_validations >= options.patience):
            stop = f"no improvement in {options.patience} validations"
        return self._agree(best), stop

    def finish(self, stop: str, last_valid: dict) -> TrainResult:
        """Save the last step if it is not saved yet, and average the last checkpoints (Section 6.1)."""
        if self._agree(not (self.run_dir / "checkpoint_last.pt").is_file()
                       or _last_step(self.run_dir) != self.progress.step):
            self.save()
        averaged = None
        if self.options.average_last and self.main:
            paths = step_checkpoints(self.run_dir)[-self.options.average_last:]
            averaged = self.run_dir / "checkpoint_avg.pt"
            average_checkpoints(paths, averaged)
            log.info("averaged %d checkpoints -> %s", len(paths), averaged)
        return TrainResult(self.run_dir, self.progress, stop, dict(last_valid), averaged)

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank (a broadcast under torchrun; free in a single process)."""
        return bool(self._from_rank0(float(flag)))

    def _from_rank0(self, value: float) -> float:
        """Rank 0's value of `value`, on every rank (a broadcast under torchrun; free in a single process)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(t, src=0)
        return t.item()


def _last_step(run_dir: Path) -> int | None:
    paths = step_checkpoints(run_dir)
    return int(paths[-1].stem.split("_")[1]) if paths else None


def train(cfg: Config, data: PreparedData, resume: bool = False) -> TrainResult:
    return Trainer(cfg, data, resume=resume).fit()
