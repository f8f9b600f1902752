"""Shared fixtures: paths to the real corpora and one tiny trained checkpoint for the CLI tests."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Tests never touch the network. `datasets` and `huggingface_hub` read these once, when first imported, and
# without them even a local `hf:pairs.jsonl` makes `datasets` send a usage ping (and a hub name retries for
# ~20 s). Set here, before any test module imports them; subprocesses inherit them.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MULTI30K = DATA / "multi30k"


def write_pairs(prefix: Path, n: int, src: str = "de", tgt: str = "en", split: str = "val") -> Path:
    """The first n Multi30k `split` pairs as PREFIX.src / PREFIX.tgt."""
    for lang in (src, tgt):
        lines = (MULTI30K / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
        Path(f"{prefix}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return prefix


def recomputed_greedy(model, src, limit: int, *, bos: int, eos: int, pad: int) -> tuple[list[int], float]:
    """Greedy search with no cache, the incremental decoder's reference: the full teacher-forced pass over the
    whole prefix at every step, in float64 log-probs. src (1, S) long. Returns the tokens after BOS (EOS
    included, forced at `limit` tokens) and their summed log-prob."""
    prefix, total = [bos], 0.0
    with torch.no_grad():
        while prefix[-1] != eos or len(prefix) == 1:
            lprobs = model(src, torch.tensor([prefix]))[0, -1].double().log_softmax(-1)
            lprobs[pad] = -math.inf
            token = eos if len(prefix) == limit else int(lprobs.argmax())
            total += lprobs[token].item()
            prefix.append(token)
    return prefix[1:], total


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny de->en model trained for a few steps on 200 Multi30k pairs (seconds)."""
    from mt.cli import main

    tmp = tmp_path_factory.mktemp("tiny-run")
    prefix = write_pairs(tmp / "pairs", 200)
    args = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--quiet",
            "--set", f"run_dir={tmp / 'run'}", "--set", f"data.train={prefix}", "--set", f"data.valid={prefix}",
            "--set", "train.max_steps=30", "--set", "train.validate_every=30", "--set", "train.save_every=15"]
    assert main(args) == 0
    return tmp / "run" / "checkpoint_avg.pt"


COPY_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
              "tau").split()


def write_copy_task(prefix: Path, n: int, seed: int) -> Path:
    """PREFIX.src and PREFIX.tgt: n sentences of 3-8 words, each its own translation."""
    import random

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(COPY_WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]
    for side in ("src", "tgt"):
        Path(f"{prefix}.{side}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return prefix


@pytest.fixture(scope="session")
def copy_checkpoint(tmp_path_factory) -> Path:
    """A small word-level model trained to copy its input (about 15 s on 2 idle cores): its attention is
    known, each target word over the same source word."""
    from mt.cli import main

    tmp = tmp_path_factory.mktemp("copy-run")
    train, valid = write_copy_task(tmp / "train", 4000, seed=1), write_copy_task(tmp / "valid", 50, seed=2)
    overrides = [f"run_dir={tmp / 'run'}", "data.src_lang=src", "data.tgt_lang=tgt", f"data.train={train}",
                 f"data.valid={valid}", "data.spm_model_type=word", "data.vocab_size=30", "data.max_tokens=2048",
                 "model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.d_ff=256", "model.dropout=0.0",
                 "train.max_steps=300", "train.warmup_steps=50", "train.peak_lr=3e-3", "train.validate_every=300",
                 "train.save_every=300"]
    args = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--quiet"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    return tmp / "run" / "checkpoint_last.pt"


@dataclass
class Network:
    attempts: list[str]  # every try at a connection or a name lookup, each refused


@pytest.fixture
def no_network(monkeypatch) -> Network:
    """Refuse (and record) every connection and DNS lookup made from this process during the test."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return Network(attempts)
