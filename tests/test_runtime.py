"""Where and how the model runs: precision resolution and the allocator setting for CPU training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mt.runtime import decode_batch_tokens, keep_freed_memory, resolve_precision

# Allocates and frees 64 MB twenty times (the logits of a 4k-token batch are that large) and prints the median
# page faults of the last eight rounds: a fresh mapping faults in all of its 16k pages, reused memory none.
FAULTS = textwrap.dedent("""
    import json, resource, statistics, sys, torch
    from mt.runtime import keep_freed_memory
    applied = keep_freed_memory(torch.device(sys.argv[1]))
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(1 << 24)
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": statistics.median(faults[-8:])}))
""")


def _faults(device: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", FAULTS, device], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_cpu_training_reuses_freed_memory_instead_of_faulting_it_in_again():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    kept, default = _faults("cpu"), _faults("cuda")  # a GPU run leaves glibc as it is
    assert kept["applied"] and not default["applied"]
    assert default["faults"] >= 16_000  # 64 MB in 4 KiB pages
    assert kept["faults"] < 1_000
    tuned = _faults("cpu", MALLOC_ARENA_MAX="2")  # a user's own glibc settings win
    assert not tuned["applied"] and tuned["faults"] >= 16_000


def test_keep_freed_memory_leaves_gpu_runs_alone():
    assert not keep_freed_memory(torch.device("cuda", 0))


def test_auto_precision_is_bf16_only_where_the_device_has_it_natively(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for flags, want in (((True, False), "bf16"), ((False, True), "bf16"), ((False, False), "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=flags[0]: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=flags[1]: v, raising=False)
        assert resolve_precision("auto", cpu) == want, flags
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    for capability, want in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, v=capability: v)
        assert resolve_precision("auto", gpu) == want


def test_decode_batches_are_chosen_by_device_unless_the_config_names_a_size():
    assert decode_batch_tokens(0, torch.device("cpu")) == 2048
    assert decode_batch_tokens(0, torch.device("cuda")) == 8192
    assert decode_batch_tokens(500, torch.device("cpu")) == 500
