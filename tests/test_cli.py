"""The `mt` command: help, version, data preparation, averaging, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mt import __version__
from mt.checkpoint import load_checkpoint

from conftest import ROOT, write_pairs


def mt(*args: str, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "mt", *args], capture_output=True, text=True, cwd=cwd)


def test_version_and_help_text_name_the_key_options():
    assert mt("--version").stdout.strip() == f"mt {__version__}"
    train = mt("train", "--help").stdout
    for option in ("--config", "--resume", "--set", "--prepare-only"):
        assert option in train
    translate = mt("translate", "--help").stdout
    for option in ("--checkpoint", "--input", "--output", "--beam-size", "--length-penalty", "--nbest",
                   "--max-tokens"):
        assert option in translate
    assert "-t TEST_SET" in mt("eval", "--help").stdout


def test_prepare_only_prints_vocabulary_and_batch_statistics(tmp_path):
    prefix = write_pairs(tmp_path / "p", 300)
    r = mt("train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--prepare-only", "--quiet",
           "--set", f"run_dir={tmp_path / 'run'}", "--set", f"data.train={prefix}", "--set", f"data.valid={prefix}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("vocabulary: ") and "(joint)" in lines[0]
    assert lines[1] == "train: 300 pairs; dev: 300 pairs"
    assert lines[2].startswith("batches at 1024 tokens per side: ") and "real tokens" in lines[2]
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "spm.model").is_file()


def _bad_corpus(tmp_path: Path, de: bytes, en: bytes) -> Path:
    (tmp_path / "c.de").write_bytes(de)
    (tmp_path / "c.en").write_bytes(en)
    return tmp_path / "c"


@pytest.mark.parametrize("case, expected", [
    ("bad key", "configs/tiny.yaml: unknown key 'model.d_modle' (did you mean 'model.d_model'?)"),
    ("missing file", "nope.de: file not found"),
    ("mismatched", "c.en: has 1 lines but"),
    ("invalid utf-8", "c.de:2: invalid UTF-8"),
    ("empty", "no non-empty sentence pairs"),
])
def test_bad_input_prints_exactly_one_line_and_exits_2(tmp_path, case, expected):
    sets = [f"run_dir={tmp_path / 'run'}"]
    if case == "bad key":
        sets.append("model.d_modle=3")
    elif case == "missing file":
        sets.append(f"data.train={tmp_path / 'nope'}")
    else:
        content = {"mismatched": (b"a\nb\n", b"a\n"), "invalid utf-8": (b"a\n\xc3\x28\n", b"a\nb\n"),
                   "empty": (b"", b"")}[case]
        sets.append(f"data.train={_bad_corpus(tmp_path, *content)}")
    args = ["train", "--config", "configs/tiny.yaml", "--prepare-only"]
    for s in sets:
        args += ["--set", s]
    r = mt(*args, cwd=ROOT)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    errors = [line for line in err if line.startswith("mt: error:")]
    assert len(errors) == 1 and expected in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_debug_shows_the_traceback():
    r = mt("train", "--config", "nope.yaml", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_average_command_averages_the_last_checkpoints(tiny_checkpoint, tmp_path):
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
