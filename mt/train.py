"""The training loop: gradient accumulation, logging, budgets, validation, checkpoints, preemption.

One optimiser step consumes `update_freq` token batches (gradient accumulation), so a small device reaches
the paper's ~25k-token batches. The loop never synchronises with the device inside a step: losses are
accumulated as tensors and read (`.item()`) only when a line is logged.

A run killed and resumed with `--resume` ends with the same weights as an uninterrupted one (bitwise on a CPU;
on a GPU within the rounding of kernels that may sum in another order): the checkpoint holds the model, the
optimiser, the scaler, the step, the RNG states, the data position (epoch, batch) and the step budget a time
budget became, and the batch order is a pure function of (seed, epoch).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mt.checkpoint import (average_checkpoints, build_model, load_latest_checkpoint, model_spec,
                           model_spec_difference, remap_data_position, save_run_checkpoint, step_checkpoints,
                           vocab_state)
from mt.config import Config, to_dict
from mt.data import Batch, PreparedData, iterate_batches
from mt.errors import MTError
from mt.loss import label_smoothed_loss
from mt.metrics import Clock, Meter, NonFinite, append_record, mirror_record, tensorboard_writer
from mt.optim import learning_rate, make_optimizer
from mt.runtime import (agree, autocast, describe_hardware, from_rank0, gather, init_distributed, matmul_peak,
                        max_over_ranks, preemption_signals, resolve_device, resolve_precision, rng_state,
                        set_rng_state, sum_over_ranks)
from mt.validation import validate

log = logging.getLogger(__name__)

PREEMPTION_CHECK_EVERY = 10  # steps between the ranks' agreement on a preemption signal under torchrun


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
    step_budget: int | None = None  # max_time_minutes as steps, fixed once the speed is known


@dataclass
class TrainResult:
    run_dir: Path
    progress: Progress
    stop_reason: str
    last_valid: dict = field(default_factory=dict)
    averaged: Path | None = None
    preempted: bool = False

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
        if self.preempted:
            lines.append("continue with: mt train --config ... --resume")
        return lines


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
        self.lr = 0.0  # train_step keeps it up to date
        self.nonfinite = NonFinite.zeros(self.device)
        self.signal: int | None = None  # a preemption signal received, handled after the current step
        self.validated_step = 0  # the last step this process validated (on every rank; 0: none yet)
        self.clock = Clock()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume:
            self._resume()
        # Same directory on resume: TensorBoard reads its event files as one run, from purge_step on the new one's.
        self.board = (tensorboard_writer(self.run_dir / "tensorboard", purge_step=self.progress.step + 1)
                      if self.main and "tensorboard" in self.options.log_to else None)
        log.info("model: %.1fM parameters on %s, %s%s", self.model.num_parameters() / 1e6, self.device,
                 self.precision + (" (auto)" if self.options.precision == "auto" else ""),
                 f", {self.world} processes" if self.world > 1 else "")

    # ---- checkpoints

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(), "model_spec": self.spec, "config": to_dict(self.cfg),
            "vocab": vocab_state(self.data.vocab), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "progress": vars(self.progress).copy(), "precision": self.precision,
            "rng": gather(rng_state(self.device)),  # every rank's (a collective)
            "step": self.progress.step,
        }

    def save(self, best: bool = False, last_only: bool = False) -> None:
        """Rank 0 writes the run's checkpoint (see `save_run_checkpoint`); a failed write stops every rank."""
        started, state, error = time.time(), self._state(), ""
        if self.main:
            try:
                save_run_checkpoint(self.run_dir, self.progress.step, state, best=best, last_only=last_only,
                                    keep=self.options.keep_checkpoints)
            except MTError as e:
                error = str(e)
        if agree(bool(error)):
            raise MTError(error or "rank 0 could not write the checkpoint (its error is in its log)")
        self.clock.save(time.time() - started)

    def _resume(self) -> None:
        path, state = load_latest_checkpoint(self.run_dir)
        differs = model_spec_difference(state["model_spec"], self.spec, str(path))
        if differs:
            raise MTError(f"{path}: the checkpoint's {differs} differs from the config's; resume with the config "
                          "the run started with")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        if state.get("precision", self.precision) != self.precision:  # `auto` on another machine, say
            log.warning("%s was trained in %s, resuming in %s", path, state["precision"], self.precision)
        rngs = state["rng"]  # one per rank
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank], self.device)
        else:
            self.progress.batch = remap_data_position(path, self.progress.epoch, self.progress.batch, len(rngs),
                                                      self.world)
            log.warning("%s was saved by %d processes, resuming with %d: batch %d of epoch %d is now position %d, "
                        "and dropout masks differ from an uninterrupted run", path, len(rngs), self.world,
                        state["progress"]["batch"], self.progress.epoch, self.progress.batch)
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

    def next_update(self, micro_batches: Iterator) -> tuple[list[Batch], int, tuple[int, int]]:
        """The `update_freq` batches of the next optimiser step, the target tokens of all ranks' batches, and
        the data position (epoch, batch) after them, which `fit` records once they are trained."""
        batches, n_tokens, position = [], 0, (self.progress.epoch, self.progress.batch)
        for _ in range(self.options.update_freq):
            batch, group_tokens, *position = next(micro_batches)
            batches.append(batch)
            n_tokens += group_tokens
        return batches, n_tokens, tuple(position)

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
        self.lr = learning_rate(step, options, self.cfg.model.d_model, done=(step - 1) / self.step_limit())
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.scaler.unscale_(self.optimizer)  # nothing to do outside fp16
        if options.clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), options.clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer_step(torch.isfinite(norm))
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        return total_loss, total_nll

    def optimizer_step(self, finite: torch.Tensor) -> None:
        """Adam's update, skipped where the gradient is not finite, without waiting for the device: fp16's
        gradient scaler skips it itself, fused Adam takes the flag on the device (its step count stays)."""
        if self.precision == "fp16":  # overflows are the scaler's way to find its scale: not counted
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return
        nonfinite = (~finite).float()
        self.nonfinite.add(nonfinite)
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = nonfinite
            self.optimizer.step()
            del self.optimizer.found_inf
        elif bool(finite):  # Adam without a fused kernel for this device: a host read
            self.optimizer.step()

    def step_limit(self) -> int:
        """The step the run ends at: max_steps, or the time budget's steps once they are known."""
        budget = self.progress.step_budget
        return self.options.max_steps if budget is None else min(self.options.max_steps, budget)

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
        """Train until a budget, patience or a preemption signal ends the run: each optimiser step is followed
        by logging, the budgets' check, validation and saving, each when it is due."""
        options, progress = self.options, self.progress
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:  # before the clock starts: the peak's matmuls are not training time
            self.log_metrics({"step": progress.step, **self.hardware_record()})
        self.start_time, self.start_elapsed = time.time(), progress.elapsed
        meter = Meter(torch.zeros((), device=self.device), torch.zeros((), device=self.device))
        last_valid: dict = {}
        micro_batches = self.micro_batches()
        # A bar on a terminal (tqdm's None: only on a TTY); elsewhere, or with --quiet, a log line per log_every.
        bar = tqdm(total=self.expected_last_step(), initial=progress.step, desc="train", unit="step",
                   dynamic_ncols=True, disable=None if self.main and log.isEnabledFor(logging.INFO) else True,
                   mininterval=1.0)
        stop = self.budget_spent()
        with preemption_signals(self.note_signal):
            while not stop:
                started = time.time()
                batches, n_tokens, position = self.next_update(micro_batches)
                if options.max_epochs and position[0] >= options.max_epochs:
                    # Not trained: the data position stays before these batches, and the step before is the last.
                    stop = f"max_epochs {options.max_epochs}"
                else:
                    loss, nll = self.train_step(batches, n_tokens)
                    progress.epoch, progress.batch = position
                    meter.loss += loss
                    meter.nll += nll
                    meter.tokens += sum(b.n_tgt_tokens for b in batches)
                    progress.elapsed = self.start_elapsed + time.time() - self.start_time
                    seconds = time.time() - started
                    meter.seconds += seconds
                    self.clock.step(seconds)
                    bar.update(1)
                    if progress.step % options.log_every == 0:
                        self.log_training(meter, bar)
                    stop = self.budget_spent() or self.preempted()
                    bar.total = self.expected_last_step()
                best, stop = self.validate_if_due(stop, last_valid)
                if stop.startswith("preempted"):
                    self.save(last_only=True)
                elif progress.step % options.save_every == 0 or best or stop:
                    self.save(best=best)
        bar.close()
        return self.finish(stop, last_valid)

    def log_training(self, meter: Meter, bar: tqdm) -> None:
        """One metrics.jsonl record of all ranks' loss and tokens/s, and the progress bar's figures (or a log line
        where there is no terminal). Stops the run when too many steps in a row had a non-finite gradient."""
        progress = self.progress
        sums = torch.stack([meter.loss, meter.nll, torch.tensor(float(meter.tokens), device=self.device),
                            self.nonfinite.since_log, self.nonfinite.longest])
        if self.world > 1:  # sums over ranks; the non-finite counts are the same on every rank
            sums[:3] = sum_over_ranks(sums[:3])
        loss, nll, tokens, skipped, longest = sums.tolist()
        record = {"step": progress.step, "epoch": progress.epoch, "loss": loss / tokens, "nll": nll / tokens,
                  "lr": self.lr, "tokens_per_s": tokens / max(meter.seconds, 1e-9), "elapsed_s": progress.elapsed}
        record["ppl"] = math.exp(min(record["nll"], 50.0))
        if skipped:
            record["skipped_steps"] = int(skipped)
            log.warning("step %d: %d of the last %d updates skipped: the loss or the gradient was not finite",
                        progress.step, skipped, self.options.log_every)
        bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{record['ppl']:.1f}", lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_s']:.0f}")
        if bar.disable and self.main:  # a log file or a batch job: a line per log step instead
            last = self.expected_last_step()
            eta = (last - progress.step) * self.clock.seconds_per_step(self.options.validate_every,
                                                                       self.options.save_every)
            log.info("step %d/%d: loss %.3f, ppl %.1f, lr %.2e, %.0f tokens/s, ETA %s", progress.step, last,
                     record["loss"], record["ppl"], record["lr"], record["tokens_per_s"], tqdm.format_interval(eta))
        self.log_metrics(record)
        meter.reset()
        self.nonfinite.since_log.zero_()
        if longest >= self.options.nonfinite_limit:
            raise MTError(f"{int(longest)} updates in a row had a non-finite loss or gradient (train.nonfinite_limit "
                          f"{self.options.nonfinite_limit}); the weights are those of the last finite update, "
                          f"{self.run_dir / 'checkpoint_last.pt'} the last checkpoint. Lower the learning rate, "
                          "or train in fp32")

    def log_metrics(self, record: dict) -> None:
        if self.main:
            append_record(self.metrics_path, record)
            if self.board is not None:
                mirror_record(self.board, record)

    def hardware_record(self) -> dict:
        """What this process trains on, and the figures an MFU estimate needs: the model's training FLOPs per
        target token at the corpus's mean lengths (EOS and BOS included) and a matmul peak measured here."""
        train = self.data.train
        flops = self.model.flops_per_token(float(train.src_lens.mean()) + 1, float(train.tgt_lens.mean()) + 1)
        return {"hardware": describe_hardware(self.device, self.world), "precision": self.precision,
                "flops_per_token": flops, "peak_flops": matmul_peak(self.precision, self.device)}

    def expected_last_step(self) -> int:
        """The step the run should end at: `step_limit`, or while a time budget is not yet a step budget, the
        steps that fit in the time left at this process's speed so far (for the bar and the ETA)."""
        options, progress = self.options, self.progress
        if not options.max_time_minutes or progress.step_budget is not None or not self.clock.steps:
            return self.step_limit()
        left = options.max_time_minutes * 60 - progress.elapsed
        return min(options.max_steps, self.clock.steps_that_fit(progress.step, left, options.validate_every,
                                                                options.save_every))

    def budget_spent(self) -> str:
        """The stop reason once max_steps or the time budget is spent, else "".

        A time budget becomes a step budget after `budget_calibration_steps` steps and a validation: from this
        process's seconds per training step, per validation and per save, the steps that fit in what is left.
        It is recorded in `progress`, so from then on the run and its learning rate depend on the step alone,
        and a run killed and resumed ends exactly as an uninterrupted run of that many steps. Under torchrun
        rank 0's clock decides, read at log steps only (a collective).
        """
        progress, options = self.progress, self.options
        if progress.step >= options.max_steps:
            return f"max_steps {options.max_steps}"
        if not options.max_time_minutes:
            return ""
        budget = options.max_time_minutes * 60
        if progress.step_budget is None and (self.world == 1 or progress.step % options.log_every == 0):
            elapsed = from_rank0(progress.elapsed)
            if elapsed >= budget:
                return f"max_time_minutes {options.max_time_minutes:g}"
            timed = self.data.valid is None or self.validated_step  # a validation's cost is known
            if progress.step >= options.budget_calibration_steps and timed:
                progress.step_budget = int(from_rank0(self.clock.steps_that_fit(
                    progress.step, budget - elapsed, options.validate_every, options.save_every)))
                log.info("max_time_minutes %g: %d steps in all, at the speed of this process's first %d",
                         options.max_time_minutes, progress.step_budget, self.clock.steps)
        if progress.step_budget is not None and progress.step >= progress.step_budget:
            return f"max_time_minutes {options.max_time_minutes:g} ({progress.step_budget} steps)"
        return ""

    def needs_timed_validation(self) -> bool:
        """Whether the time budget waits for a validation's duration to become a step budget."""
        return (bool(self.options.max_time_minutes) and self.progress.step_budget is None and not self.validated_step
                and self.data.valid is not None and self.progress.step >= self.options.budget_calibration_steps)

    def note_signal(self, signum: int, frame) -> None:
        self.signal = signum

    def preempted(self) -> str:
        """The stop reason once a preemption signal arrived, else "". Under torchrun the ranks agree on it every
        PREEMPTION_CHECK_EVERY steps (a collective that waits for the device), so all stop at the same step."""
        signum = self.signal or 0
        if self.world > 1:
            if self.progress.step % PREEMPTION_CHECK_EVERY:
                return ""
            signum = int(max_over_ranks(signum))
        return f"preempted by {signal.Signals(signum).name}" if signum else ""

    def validate_if_due(self, stop: str, last_valid: dict) -> tuple[bool, str]:
        """Validate every `validate_every` steps and before stopping; update `last_valid` in place. Returns
        whether the dev score improved and the stop reason, patience's included."""
        progress, options = self.progress, self.options
        # The last step is validated too, unless a preemption's grace period is running. (From the agreed stop
        # reason, not this rank's own signal: all ranks must reach the same collectives.)
        last = bool(stop) and not stop.startswith("preempted") and self.data.valid is not None
        due = progress.step % options.validate_every == 0 or last or self.needs_timed_validation()
        if progress.step in (0, self.validated_step) or not due:
            return False, stop
        self.validated_step = progress.step
        started = time.time()
        best = False
        if self.main:
            last_valid.clear()
            last_valid.update(validate(self.model, self.data, self.cfg, self.precision, self.device))
            best = self._improved(last_valid)
            self.log_metrics({"step": progress.step, **last_valid, "elapsed_s": progress.elapsed})
            log.info("step %d: %s", progress.step, ", ".join(f"{k} {v:.3f}" for k, v in last_valid.items()))
        self.clock.validation(time.time() - started)
        if agree(bool(options.patience) and progress.bad_validations >= options.patience):
            stop = f"no improvement in {options.patience} validations"
        return agree(best), stop

    def finish(self, stop: str, last_valid: dict) -> TrainResult:
        """Save the last step if it is not saved yet, and average the last checkpoints (Section 6.1), except
        after a preemption signal: then the run resumes later and averages at its real end."""
        preempted = stop.startswith("preempted")
        if not preempted and agree(not (self.run_dir / "checkpoint_last.pt").is_file()
                                   or _last_step(self.run_dir) != self.progress.step):
            self.save()
        averaged = None
        if self.options.average_last and self.main and not preempted:
            paths = step_checkpoints(self.run_dir)[-self.options.average_last:]
            if len(paths) < self.options.average_last:
                log.warning("averaging the %d checkpoints this run has, not train.average_last %d", len(paths),
                            self.options.average_last)
            averaged = self.run_dir / "checkpoint_avg.pt"
            average_checkpoints(paths, averaged)
            log.info("averaged %d checkpoints -> %s", len(paths), averaged)
        if self.board is not None:
            self.board.close()
        return TrainResult(self.run_dir, self.progress, stop, dict(last_valid), averaged, preempted)

def _last_step(run_dir: Path) -> int | None:
    paths = step_checkpoints(run_dir)
    return int(paths[-1].stem.split("_")[1]) if paths else None


def train(cfg: Config, data: PreparedData, resume: bool = False) -> TrainResult:
    return Trainer(cfg, data, resume=resume).fit()
