"""The training loop: label-smoothed loss, the warmup schedule, mixed precision, validation, checkpoints.

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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import sacrebleu
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mt.checkpoint import (build_model, link_or_copy, load_checkpoint, model_spec, prune_checkpoints,
                           save_checkpoint, step_checkpoints, vocab_state, average_checkpoints)
from mt.config import Config, TrainConfig, to_dict
from mt.data import EOS, PAD, Batch, PreparedData, collate, iterate_batches, make_batches, read_corpus
from mt.errors import MTError
from mt.model import resolve_precision
from mt.search import greedy_search

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


# Logits per chunk of the loss on a CPU: a float32 chunk of at most 4 MB. glibc's malloc serves blocks of this
# size from memory the process already holds, where a whole (n, vocab) float32 tensor (64 MB for 2k tokens x
# 8k types) or 16 MB chunks are mapped and page-faulted afresh at each step: measured ~5% faster than 16 MB
# chunks in a bf16 CPU training step, with a third of its page faults. A GPU has a caching allocator, but
# pays a few kernel launches per chunk: there chunks are 64x larger (256 MB; 12 for 25k tokens x 32k types).
LOSS_CHUNK_ELEMENTS = 1 << 20
GPU_LOSS_CHUNK_ELEMENTS = 1 << 26


def _loss_chunk_rows(logits: torch.Tensor) -> int:
    """Rows of the (n, vocab) logits per chunk of the loss, on their device."""
    elements = LOSS_CHUNK_ELEMENTS if logits.device.type == "cpu" else GPU_LOSS_CHUNK_ELEMENTS
    return max(1, elements // logits.size(-1))


class _LabelSmoothedLoss(torch.autograd.Function):
    """The loss and the NLL of `label_smoothed_loss`, computed chunk by chunk, with the gradient made in the
    forward pass.

    Per row, with p = softmax(logits) and lse = log(sum(exp(logits))): nll = lse - logits[target] and the
    uniform part -mean(log p) = lse - mean(logits). The gradient of the loss with respect to the logits is
    p - (smoothed target), zero on padding rows. The forward pass computes p anyway, so it writes that gradient
    and the backward pass only scales it: one softmax over the (n, vocab) logits per step, where a log-softmax
    forward and a softmax again backward took two (a bf16 step's loss 30% faster on a CPU, 2k x 8k logits).
    Autograd's version of the same loss keeps a float32 copy of the log-probs and makes five more full-size
    temporaries, the largest tensors of a training step.

    lse comes from the most likely token: lse = max(logits) - log(max(p)), where max(p) >= 1 / vocab keeps the
    logarithm well-conditioned. The stored gradient is rounded to the logits' dtype after the target's
    1 - epsilon is subtracted in float32 (in bf16 a confident p = 0.9 minus 0.9 would keep no digit), and
    rounded again when backward scales it (bf16: relative error ~2^-8 instead of ~2^-9). fp16 logits keep a
    float32 gradient until it is scaled: rounded to fp16 unscaled, eps / vocab (3e-6 at 32k) falls below
    fp16's normal range, which loss scaling exists to avoid.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, epsilon: float, pad: int, reuse_logits: bool):
        n, V = logits.shape
        rows = _loss_chunk_rows(logits)
        keep = target.ne(pad)
        target_logit = logits.gather(-1, target[:, None]).squeeze(-1).float()  # before any overwrite
        lse, uniform = torch.empty(n, device=logits.device), torch.empty(n, device=logits.device)
        want_grad = ctx.needs_input_grad[0]
        # d loss / d logits (for d loss = 1). Written over the logits when the caller allows it: they are not
        # needed once this chunk is read, their memory is already the process's (a fresh 30-60 MB buffer costs
        # its page faults on a CPU), and the step's largest tensor is not held twice.
        grad_dtype = torch.float32 if logits.dtype == torch.float16 else logits.dtype
        if not want_grad:
            grad = None
        elif reuse_logits and grad_dtype == logits.dtype:
            grad = logits.detach()
        else:
            grad = torch.empty_like(logits, dtype=grad_dtype)
        for i in range(0, n, rows):
            x = logits[i:i + rows].float()  # (rows, V)
            x_max = x.amax(dim=-1)
            p = torch.softmax(x, dim=-1)
            lse[i:i + rows] = lse_i = x_max - p.amax(dim=-1).log()  # p's max is 1 / sum(exp(x - x_max))
            uniform[i:i + rows] = lse_i - x.sum(dim=-1) / V
            if want_grad:
                t = target[i:i + rows, None]
                p.scatter_add_(-1, t, p.new_full(t.shape, epsilon - 1.0)).sub_(epsilon / V)
                grad[i:i + rows] = p.mul_(keep[i:i + rows, None])
        nll = (lse - target_logit).masked_fill(~keep, 0.0).sum()
        uniform = uniform.masked_fill(~keep, 0.0).sum()
        ctx.grad, ctx.epsilon, ctx.dtype = grad, epsilon, logits.dtype
        ctx.save_for_backward(target, keep)
        ctx.set_materialize_grads(False)  # None for an output with no gradient (nll, in training): no work for it
        return (1.0 - epsilon) * nll + epsilon * uniform, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor | None, grad_nll: torch.Tensor | None):
        target, keep = ctx.saved_tensors
        if ctx.grad is None:
            raise RuntimeError("label_smoothed_loss: backward called twice, or on logits that need no gradient")
        grad, ctx.grad = ctx.grad, None  # scaled in place, so released here: no second backward
        eps, V = ctx.epsilon, grad.size(-1)
        grad.mul_(sum(g for g in (grad_loss, grad_nll) if g is not None))
        if grad_nll is not None:  # d nll / d logits = p - onehot = (d loss / d logits) + eps / V - eps onehot
            k = keep.to(grad.dtype)[:, None]
            grad.add_(k * (grad_nll * (eps / V)).to(grad.dtype))
            grad.scatter_add_(-1, target[:, None], k * (grad_nll * -eps).to(grad.dtype))
        return grad.to(ctx.dtype), None, None, None, None


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float, pad: int = PAD,
                        reuse_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-smoothed cross-entropy (Section 5.4; Szegedy et al., 2016), summed over non-pad targets.

    logits (n, vocab), target (n,). The smoothed target puts 1 - epsilon on the reference and spreads
    epsilon uniformly over the whole vocabulary (the definition `F.cross_entropy(label_smoothing=)` uses).
    Returns (loss, nll): the smoothed loss to optimise and the plain negative log-likelihood, from which
    perplexity is reported. Both are float32 scalars and both can be differentiated, once.

    reuse_logits: the gradient overwrites `logits` (when they need one; not fp16 ones, whose gradient stays
    float32 until scaled), the training step's way: the caller must not read them again. The logits must be
    the output of an operation, not a leaf such as a parameter. Autograd's version check still refuses a
    backward through an operation that saved them for its own backward (`Linear` does not), but not a
    read by the caller, and saved-tensor hooks (`save_on_cpu`) do not see the stored gradient.
    """
    if reuse_logits and logits.is_leaf and logits.requires_grad:
        raise ValueError("label_smoothed_loss: reuse_logits would overwrite a leaf tensor; pass computed logits")
    return _LabelSmoothedLoss.apply(logits, target, epsilon, pad, reuse_logits)


# --------------------------------------------------------------------------------------------------------
# Set-up helpers


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present; under torchrun each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MTError(f"train.device is '{name}' but no CUDA device is available")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): from torchrun's environment, (0, 1) in a single process.

    NCCL on CUDA, gloo on the CPU. Every rank runs the same loop; only rank 0 validates, logs and saves.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA and CPU; fp16 on CUDA only (it needs the gradient scaler)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the paper's beta1 = 0.9, beta2 = 0.98, epsilon = 1e-9 (Section 5.3), fused where supported."""
    kwargs = dict(lr=0.0, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(model.parameters(), foreach=device.type == "cuda", **kwargs)


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


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


class Trainer:
    """Owns the model, optimiser and run directory of one training run."""

    def __init__(self, cfg: Config, data: PreparedData, resume: bool = False):
        self.cfg, self.data = cfg, data
        self.tc = cfg.train
        self.run_dir = Path(cfg.run_dir)
        self.device = resolve_device(self.tc.device)
        self.precision = resolve_precision(self.tc.precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise MTError("train.precision fp16 needs a CUDA device; use bf16 on the CPU")
        if self.tc.num_threads:
            torch.set_num_threads(self.tc.num_threads)
        self.rank, self.world = init_distributed(self.device)
        self.main = self.rank == 0
        torch.manual_seed(self.tc.seed)  # the same initial weights on every rank
        self.spec = model_spec(cfg.model, data.vocab)
        self.model = build_model(self.spec).to(self.device)
        torch.manual_seed(self.tc.seed + self.rank)  # but different dropout masks
        # Train through the DDP / compiled wrappers but save the plain module's weights (their keys are prefixed).
        self.ddp: DistributedDataParallel | None = None
        self.step_model: torch.nn.Module = self.model
        if self.world > 1:
            # The only buffers are the sinusoid tables, the same on every rank: no broadcast before each forward.
            self.step_model = self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        if self.tc.compile:
            self.step_model = torch.compile(self.step_model)
        self.optimizer = make_optimizer(self.model, self.tc, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.progress = Progress()
        self.time_done, self.lr = 0.0, 0.0  # fit() keeps both up to date
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume:
            self._resume()
        log.info("model: %.1fM parameters on %s, %s%s", sum(p.numel() for p in self.model.parameters()) / 1e6,
                 self.device, self.precision + (" (auto)" if self.tc.precision == "auto" else ""),
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
        prune_checkpoints(self.run_dir, self.tc.keep_checkpoints)

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
        p = self.progress
        epoch, start = p.epoch, p.batch
        while True:
            empty = True
            for position, batch, group_tokens in iterate_batches(
                    self.data.train, self.cfg.data.max_tokens, self.tc.seed, epoch, start=start,
                    shard=(self.rank, self.world)):
                empty = False
                yield batch, group_tokens, epoch, position + 1
            if empty and start == 0:
                raise MTError(f"{self.cfg.data.train}: too few batches for {self.world} processes; "
                              "lower data.max_tokens")
            epoch, start = epoch + 1, 0

    # ---- one update

    def train_step(self, batches: list[Batch], n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over `update_freq` batches, then one optimiser step.

        The loss is normalised by `n_tokens`, the target tokens of the whole update across all ranks
        (known on the host from the batch order, so nothing waits for the device or the other ranks); DDP
        averages gradients over ranks, hence the factor `world`. Returns this rank's summed (loss, nll).
        """
        model, tc = self.step_model, self.tc
        model.train()
        total_loss = torch.zeros((), device=self.device)
        total_nll = torch.zeros((), device=self.device)
        for i, b in enumerate(batches):
            b = b.to(self.device)
            # DDP all-reduces gradients on every backward unless told not to: only the last one needs it.
            last = i == len(batches) - 1
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                with autocast(self.precision, self.device):
                    logits = model(b.src, b.tgt_in)
                loss, nll = label_smoothed_loss(logits.flatten(0, 1), b.tgt_out.flatten(), tc.label_smoothing,
                                                reuse_logits=True)
                self.scaler.scale(loss * (self.world / n_tokens)).backward()
            total_loss += loss.detach()
            total_nll += nll.detach()
        step = self.progress.step + 1
        self.lr = learning_rate(step, tc, self.cfg.model.d_model, done=max((step - 1) / tc.max_steps, self.time_done))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if tc.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        return total_loss, total_nll

    # ---- validation

    @torch.no_grad()
    def validate(self) -> dict:
        """Dev loss and perplexity (teacher forcing), and dev BLEU from greedy decoding."""
        valid = self.data.valid
        if valid is None:
            return {}
        self.model.eval()
        sums = torch.zeros(2, device=self.device)  # (loss, nll), read once at the end
        tokens = 0
        batches = make_batches(valid.src_lens, valid.tgt_lens, self.cfg.data.max_tokens, 0, 0, shuffle=False)
        for indices in batches:
            b = collate(valid, indices)
            tokens += b.n_tgt_tokens  # on the host, before the batch moves
            b = b.to(self.device)
            with autocast(self.precision, self.device):
                logits = self.model(b.src, b.tgt_in)
            sums += torch.stack(label_smoothed_loss(logits.flatten(0, 1), b.tgt_out.flatten(),
                                                    self.tc.label_smoothing))
        loss_sum, nll_sum = sums.tolist()
        result = {"valid_loss": loss_sum / tokens, "valid_nll": nll_sum / tokens,
                  "valid_ppl": math.exp(min(nll_sum / tokens, 50.0))}
        if self.tc.valid_bleu:
            result["valid_bleu"] = self.dev_bleu()
        return result

    def dev_bleu(self) -> float:
        """Greedy-decode the dev sources and score them against the raw references with sacreBLEU."""
        valid, vocab, dc = self.data.valid, self.data.vocab, self.cfg.decode
        refs = [t for _, t in read_corpus(self.cfg.data.valid, self.cfg.data.src_lang, self.cfg.data.tgt_lang)]
        hyps = [""] * len(valid)
        zeros = valid.tgt_lens * 0
        for indices in make_batches(valid.src_lens, zeros, dc.max_tokens, 0, 0, shuffle=False):
            b = collate(valid, indices).to(self.device)
            with autocast(self.precision, self.device):
                out = greedy_search(self.model, b.src, bos=self.data.vocab.tgt.bos_id(), eos=EOS, pad=PAD,
                                    max_len_a=dc.max_len_a, max_len_b=dc.max_len_b)
            tokens = out.tokens[:, 0].tolist()
            for i, ids in zip(indices.tolist(), tokens):
                hyps[i] = vocab.tgt.decode([t for t in ids if t not in (PAD, EOS)])
        return sacrebleu.corpus_bleu(hyps, [refs]).score

    def _improved(self, result: dict) -> bool:
        if self.tc.best_metric == "bleu" and "valid_bleu" in result:
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

    def log_metrics(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self) -> TrainResult:
        tc, p = self.tc, self.progress
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start_time, start_elapsed = time.time(), p.elapsed
        budget = tc.max_time_minutes * 60 if tc.max_time_minutes else math.inf
        self.time_done = p.elapsed / budget  # the fraction of the wall-time budget spent (the same on all ranks)
        log_loss = torch.zeros((), device=self.device)
        log_nll = torch.zeros((), device=self.device)
        log_tokens, log_start = 0, time.time()
        last_valid: dict = {}
        stop = ""
        batches = self.micro_batches()
        bar = tqdm(total=tc.max_steps, initial=p.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None if self.main else True, mininterval=1.0)
        while not stop:
            if p.step >= tc.max_steps:
                stop = f"max_steps {tc.max_steps}"
                break
            group, n_tokens = [], 0
            for _ in range(tc.update_freq):
                batch, group_tokens, p.epoch, p.batch = next(batches)
                group.append(batch)
                n_tokens += group_tokens
            if tc.max_epochs and p.epoch >= tc.max_epochs:
                stop = f"max_epochs {tc.max_epochs}"
                break
            loss, nll = self.train_step(group, n_tokens)
            log_loss += loss
            log_nll += nll
            log_tokens += sum(b.n_tgt_tokens for b in group)
            p.elapsed = start_elapsed + time.time() - start_time
            bar.update(1)
            if p.step % tc.log_every == 0:
                now = time.time()
                record = {"step": p.step, "epoch": p.epoch, "loss": log_loss.item() / log_tokens,
                          "nll": log_nll.item() / log_tokens,
                          "lr": self.lr,
                          "tokens_per_s": log_tokens / max(now - log_start, 1e-9), "elapsed_s": p.elapsed}
                record["ppl"] = math.exp(min(record["nll"], 50.0))
                bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{record['ppl']:.1f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                if bar.disable and self.main:  # no terminal (a log file, a batch job): a line per log step instead
                    log.info("step %d: loss %.3f, ppl %.1f, lr %.2e, %.0f tokens/s", p.step, record["loss"],
                             record["ppl"], record["lr"], record["tokens_per_s"])
                self.log_metrics(record)
                log_loss.zero_()
                log_nll.zero_()
                log_tokens, log_start = 0, now
            # Ranks see slightly different clocks: under torchrun rank 0's rules, read at log steps only (a
            # collective), so every rank stops at the same step and uses the same learning rate.
            if self.world == 1 or p.step % tc.log_every == 0:
                self.time_done = self._from_rank0(p.elapsed / budget)
                if self.time_done >= 1.0:
                    stop = f"max_time_minutes {tc.max_time_minutes:g}"
            best, paused = False, time.time()
            if p.step % tc.validate_every == 0 or (stop and self.data.valid is not None):
                if self.main:
                    last_valid = self.validate()
                    best = self._improved(last_valid)
                    self.log_metrics({"step": p.step, **last_valid})
                    log.info("step %d: %s", p.step, ", ".join(f"{k} {v:.3f}" for k, v in last_valid.items()))
                if self._agree(bool(tc.patience) and p.bad_validations >= tc.patience):
                    stop = f"no improvement in {tc.patience} validations"
                best = self._agree(best)
            if p.step % tc.save_every == 0 or best or stop or p.step >= tc.max_steps:
                self.save(best=best)
            log_start += time.time() - paused  # tokens/s counts training time, not validation or saving
        bar.close()
        if self._agree(not (self.run_dir / "checkpoint_last.pt").is_file() or _last_step(self.run_dir) != p.step):
            self.save()
        averaged = None
        if tc.average_last and self.main:
            paths = step_checkpoints(self.run_dir)[-tc.average_last:]
            averaged = self.run_dir / "checkpoint_avg.pt"
            average_checkpoints(paths, averaged)
            log.info("averaged %d checkpoints -> %s", len(paths), averaged)
        return TrainResult(self.run_dir, p, stop, last_valid, averaged)


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
