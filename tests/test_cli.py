"""The `mt` command: help, version, data preparation, averaging, and one-line errors for bad input.

Everything runs the installed console script in a subprocess, as a user would.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from mt import __version__
from mt.config import load_config

from conftest import ROOT, write_pairs

MT = Path(sys.executable).parent / "mt"


def mt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [str(MT)] if MT.is_file() else [shutil.which("mt") or "mt"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_version_and_help_text_name_the_key_options():
    r = mt("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"mt {__version__}")
    train = mt("train", "--help")
    assert train.returncode == 0 and train.stdout.startswith("usage: mt train")
    for option in ("--config", "--resume", "--set", "--prepare-only", "--debug"):
        assert option in train.stdout
    translate = mt("translate", "--help")
    assert translate.returncode == 0 and translate.stdout.startswith("usage: mt translate")
    for option in ("--checkpoint", "--input", "--output", "--beam-size", "--length-penalty", "--nbest",
                   "--max-tokens", "--method", "--device"):
        assert option in translate.stdout


def test_prepare_only_prints_vocabulary_and_batch_statistics(tmp_path):
    prefix = write_pairs(tmp_path / "p", 300)
    run = tmp_path / "run"
    sets = [f"run_dir={run}", f"data.train={prefix}", f"data.valid={prefix}"]
    config = ROOT / "configs" / "tiny.yaml"
    r = mt("train", "--config", str(config), "--prepare-only", "--quiet", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""

    # The numbers, from SentencePiece loaded straight from the model file and the filters' documented rule
    # (tiny.yaml: min_len 1, max_len 64, max_len_ratio 9).
    sp = spm.SentencePieceProcessor(model_file=str(run / "spm.model"))
    de = Path(f"{prefix}.de").read_text(encoding="utf-8").splitlines()
    en = Path(f"{prefix}.en").read_text(encoding="utf-8").splitlines()
    lens = [(len(sp.encode(s)), len(sp.encode(t))) for s, t in zip(de, en)]
    kept_lens = [(a, b) for a, b in lens if 1 <= min(a, b) and max(a, b) <= 64 and max(a, b) <= 9 * max(min(a, b), 1)]
    kept = len(kept_lens)
    assert 250 < kept < 300  # at vocab_size 400 a few long captions pass 64 pieces

    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    assert lines[0] == f"vocabulary: {sp.get_piece_size()} pieces (joint) in {run}"
    assert lines[1] == f"train: {kept} pairs; dev: 300 pairs"  # the dev set is not filtered
    m = re.fullmatch(r"batches at 1024 tokens per side: (\d+) batches, ([\d.]+) pairs per batch, "
                     r"real tokens ([\d.]+)% of padded", lines[2])
    assert m, lines[2]
    batches, per_batch, percent = int(m[1]), float(m[2]), float(m[3])
    assert abs(batches * per_batch - kept) <= 0.05 * batches  # pairs per batch is printed to 0.1
    # No batch exceeds 1024 padded tokens per side, so there are at least real tokens / 1024 batches, and the
    # real share is at least real / (2 sides x 1024 x batches).
    src_real = sum(a + 1 for a, _ in kept_lens)  # + EOS
    tgt_real = sum(b + 1 for _, b in kept_lens)  # + EOS (or BOS)
    assert batches >= -(-max(src_real, tgt_real) // 1024)
    assert 100 * (src_real + tgt_real) / (2 * 1024 * batches) - 0.05 <= percent <= 100

    # config.yaml holds the resolved config: the file plus the --set overrides.
    assert load_config(run / "config.yaml") == load_config(config, sets)
    assert sorted(p.name for p in run.iterdir()) == ["cache", "config.yaml", "spm.json", "spm.model"]


def _bad_corpus(tmp_path: Path, de: bytes, en: bytes) -> Path:
    (tmp_path / "c.de").write_bytes(de)
    (tmp_path / "c.en").write_bytes(en)
    return tmp_path / "c"


@pytest.mark.parametrize("case, expected", [
    ("bad key", "--set model.d_modle=3: unknown key 'model.d_modle' (did you mean 'model.d_model'?)"),
    ("missing file", "{tmp}/nope.de: file not found"),
    ("mismatched", "{tmp}/c.en: has 1 lines but {tmp}/c.de has 2: "
                   "the two sides of a parallel corpus must have the same number of lines"),
    ("invalid utf-8", "{tmp}/c.de:2: invalid UTF-8 (byte 0 of the line)"),
    ("empty", "{tmp}/c: no non-empty sentence pairs to learn a vocabulary from"),
    ("missing config", "nope.yaml: config file not found"),
])
def test_bad_input_prints_exactly_one_line_and_exits_2(tmp_path, case, expected):
    sets = [f"run_dir={tmp_path / 'run'}"]
    if case == "bad key":
        sets.append("model.d_modle=3")
    elif case == "missing file":
        sets.append(f"data.train={tmp_path / 'nope'}")
    elif case != "missing config":
        content = {"mismatched": (b"a\nb\n", b"a\n"), "invalid utf-8": (b"a\n\xc3\x28\n", b"a\nb\n"),
                   "empty": (b"", b"")}[case]
        sets.append(f"data.train={_bad_corpus(tmp_path, *content)}")
    config = "nope.yaml" if case == "missing config" else "configs/tiny.yaml"
    args = ["train", "--config", config, "--prepare-only"]  # not --quiet: no log line may come with the error
    for s in sets:
        args += ["--set", s]
    r = mt(*args, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"mt: error: {expected.format(tmp=tmp_path)}"], r.stderr
    assert r.stdout == ""


def test_debug_shows_the_traceback():
    r = mt("train", "--config", "nope.yaml", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "mt.errors.MTError: nope.yaml: config file not found"


@pytest.mark.slow  # trains the shared tiny checkpoint (tens of seconds on a busy CPU) unless another test did
def test_average_command_averages_the_last_checkpoints(tiny_checkpoint, tmp_path):
    from mt.checkpoint import load_checkpoint

    run = tiny_checkpoint.parent
    out = tmp_path / "avg.pt"
    r = mt("average", "--run-dir", str(run), "--last", "2", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("averaged 2 checkpoints")
    avg = load_checkpoint(out)
    parts = [load_checkpoint(p) for p in sorted(run.glob("checkpoint_[0-9]*.pt"))[-2:]]
    key = next(k for k, v in avg["model"].items() if v.is_floating_point())
    expected = (parts[0]["model"][key] + parts[1]["model"][key]) / 2
    assert (avg["model"][key] - expected).abs().max().item() < 1e-6
    assert "optimizer" not in avg  # inference weights only
