"""Where and how the model runs: the device, the precision, autocast, torchrun's process group and its
collectives, RNG states, preemption signals, and the allocator setting for CPU training.

Training (`mt.train`) and search (`mt.translate`) resolve their device and precision here, so `auto` means
the same thing in both.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import threading
import time
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from mt.errors import MTError


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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matrix products natively: a CUDA GPU from Ampere on, or an x86 CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 products are emulated through float32 and gain nothing (ARM CPUs with
    bf16 instructions are not detected)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8  # this device, not the current one
    if device.type == "cpu":
        return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision` or `decode.precision` on `device`: `auto` becomes bf16 where it is native, else fp32;
    the others stay as they are."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def decode_batch_tokens(max_tokens: int, device: torch.device) -> int:
    """`decode.max_tokens`, with 0 chosen by device: 2048 source tokens on a CPU, where larger batches of beams
    spill the caches (and their logits outgrow glibc's reuse of freed memory), 8192 on a GPU, which wants
    them large. Measured with scripts/bench_decode.py (docs/performance.md)."""
    if max_tokens:
        return max_tokens
    return 2048 if device.type == "cpu" else 8192


def describe_hardware(device: torch.device, world: int = 1) -> dict:
    """What a run trained on, for its report: the device's name, the CPU threads, torch, the processes."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:  # Linux names the CPU model here; platform.processor() is often just "x86_64"
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
    return {"device": str(device), "name": name, "threads": torch.get_num_threads(), "processes": world,
            "torch": torch.__version__}


def matmul_peak(precision: str, device: torch.device, reps: int = 3) -> float:
    """Measured FLOP/s of a square matmul in the training precision: what an MFU estimate is taken against.
    Its own generator, so the training's random stream stays that of a run without it."""
    n = 1024 if device.type == "cpu" else 8192
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.rand(n, n, generator=generator, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA and CPU; fp16 on CUDA only (it needs the gradient scaler)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


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


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def keep_freed_memory(device: torch.device) -> bool:
    """On a CPU, ask glibc to keep freed blocks for reuse instead of returning them to the kernel. Returns
    whether it did.

    glibc maps blocks over 32 MiB afresh and trims freed heap, so a CPU training step whose logits exceed
    that (4k tokens x 8k types) faults their pages in again at every step. A GPU run's large tensors live in
    PyTorch's caching allocator, so it is left alone there. Also left alone: a user's own glibc settings
    (MALLOC_*, GLIBC_TUNABLES) and C libraries other than glibc. The A/B figures are in docs/performance.md.
    """
    if (device.type != "cpu" or sys.platform != "linux"
            or any(k.startswith(("MALLOC_", "GLIBC_TUNABLES")) for k in os.environ)):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, (1 << 31) - 1))


# --------------------------------------------------------------------------------------------------------
# Collectives under torchrun; each is free (and returns its input) in a single process


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _on_backend(values: torch.Tensor) -> torch.Tensor:
    """values, float64, where the process group's backend reduces them: NCCL on the GPU, gloo on the CPU."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return values.to(device, torch.float64)


def from_rank0(value: float) -> float:
    """Rank 0's `value`, on every rank."""
    if not _distributed():
        return value
    t = _on_backend(torch.tensor([value]))
    dist.broadcast(t, src=0)
    return t.item()


def agree(flag: bool) -> bool:
    """Rank 0's decision, on every rank."""
    return bool(from_rank0(float(flag)))


def max_over_ranks(value: float) -> float:
    if not _distributed():
        return value
    t = _on_backend(torch.tensor([value]))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """values (n,) float, summed over all ranks; the same tensor in a single process."""
    if not _distributed():
        return values
    t = _on_backend(values)
    dist.all_reduce(t)
    return t.to(values)


def gather(obj: object) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if not _distributed():
        return [obj]
    objects: list = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


# --------------------------------------------------------------------------------------------------------
# Preemption


# What SLURM (`--signal`) and Kubernetes send before they stop a job.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def preemption_signals(handler: Callable[[int, object], None]) -> Iterator[None]:
    """Route SIGTERM and SIGUSR1 to `handler(signum, frame)` inside the block, the previous handlers after it.
    Only the main thread receives signals: elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
