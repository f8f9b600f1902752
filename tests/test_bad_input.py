"""Bad input to every command: exit status 2, one `mt: error:` line naming the culprit, no traceback, and no
partial output (an --output file is not created or keeps its old content; a run_dir gets no checkpoint).

Each case runs `mt.cli.main` in-process, so an exception escaping it fails the test as a traceback would.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from mt.cli import main

from conftest import ROOT, write_pairs

TINY = str(ROOT / "configs" / "tiny.yaml")
OLD_OUTPUT = "earlier output\n"


@dataclass
class Case:
    """`args` and `expected` may hold {tmp} (the test's directory), {ckpt} (the tiny trained checkpoint) and
    {run} (its run directory). `files` are written under {tmp} first, each from bytes or from a function of
    the tiny checkpoint's path. `output` names a file that must not appear ("new") or must keep OLD_OUTPUT
    ("old")."""

    args: list[str]
    expected: str
    files: dict[str, bytes | Callable[[Path], bytes]] = field(default_factory=dict)
    output: tuple[str, str] | None = None


def case(id: str, *args: str, expected: str, files=None, output=None, marks=()):
    return pytest.param(Case(list(args), expected, files or {}, output), id=id, marks=marks)


def run_mt(argv: list[str], capsys) -> tuple[int, str]:
    """Run `mt` in-process; (exit status, stderr). Any exception other than SystemExit propagates."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        status = e.code
    return status, capsys.readouterr().err


def check(c: Case, tmp_path: Path, request, capsys) -> None:
    needs_checkpoint = any("{ckpt}" in a or "{run}" in a for a in c.args) or any(
        callable(v) for v in c.files.values())
    ckpt = request.getfixturevalue("tiny_checkpoint") if needs_checkpoint else None
    fill = dict(tmp=tmp_path, ckpt=ckpt, run=ckpt.parent if ckpt else None)
    for name, content in c.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content(ckpt) if callable(content) else content)
    if c.output is not None:
        kind, name = c.output
        out = tmp_path / name
        if kind == "old":
            out.write_text(OLD_OUTPUT, encoding="utf-8")
        else:
            assert not out.exists()
    before_run = set((ckpt.parent).iterdir()) if ckpt else None

    status, err = run_mt([a.format(**fill) for a in c.args], capsys)

    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("mt: error: "), err
    assert c.expected.format(**fill) in lines[0], err
    if c.output is not None:
        kind, name = c.output
        out = tmp_path / name
        if kind == "old":
            assert out.read_text(encoding="utf-8") == OLD_OUTPUT
        else:
            assert not out.exists(), f"{out} was created"
    run = tmp_path / "run"
    assert not (run.exists() and any(run.rglob("*.pt"))), "the run directory got a checkpoint"
    if ckpt is not None:  # the shared tiny run is left as it was (average writes nothing into it)
        assert set(ckpt.parent.iterdir()) == before_run


# ---------------------------------------------------------------------------------------------------------
# mt train: the config file, --set, the corpora, the run directory


def train(*args: str) -> list[str]:
    """`mt train` into {tmp}/run for at most 2 steps; `args` come after, so they may override both."""
    return ["train", "--set", "run_dir={tmp}/run", "--set", "train.max_steps=2", *args]


def with_corpus(*args: str) -> list[str]:
    return train("--config", TINY, "--set", "data.train={tmp}/p", "--set", "data.valid={tmp}/p", *args)


def yaml_config(text: str) -> dict[str, bytes]:
    return {"c.yaml": text.encode()}


@pytest.fixture
def pairs(tmp_path) -> Path:
    return write_pairs(tmp_path / "p", 20)


TRAIN_CASES = [
    case("average-last-beyond-keep-checkpoints", *train("--config", TINY, "--set", "train.average_last=3"),
         expected="train.average_last (3) cannot exceed train.keep_checkpoints (2)"),
    case("nonfinite-limit-zero", *train("--config", TINY, "--set", "train.nonfinite_limit=0"),
         expected="train.nonfinite_limit must be positive, got 0"),
    case("config-missing", *train("--config", "{tmp}/nope.yaml"),
         expected="{tmp}/nope.yaml: config file not found"),
    case("config-invalid-yaml-line", *train("--config", "{tmp}/c.yaml"),
         files=yaml_config("model:\n  d_model: 32\n  n_heads: [2\ntrain:\n  max_steps: 3\n"),
         expected="{tmp}/c.yaml: line 4 invalid YAML"),
    case("config-invalid-utf8", *train("--config", "{tmp}/c.yaml"),
         files={"c.yaml": b"model:\n  d_model: 32 # \xff\n"},
         expected="{tmp}/c.yaml: not valid UTF-8"),
    case("config-top-level-list", *train("--config", "{tmp}/c.yaml"),
         files=yaml_config("- model\n- train\n"),
         expected="{tmp}/c.yaml: the top level must be a mapping"),
    case("config-unknown-key-typo", *train("--config", "{tmp}/c.yaml"),
         files=yaml_config("model:\n  d_modle: 32\n"),
         expected="{tmp}/c.yaml: unknown key 'model.d_modle' (did you mean 'model.d_model'?)"),
    case("config-unknown-section", *train("--config", "{tmp}/c.yaml"),
         files=yaml_config("modle:\n  d_model: 32\n"),
         expected="{tmp}/c.yaml: unknown key 'modle' (did you mean 'model'?)"),
    case("config-section-not-mapping", *train("--config", "{tmp}/c.yaml"),
         files=yaml_config("model: 32\n"),
         expected="{tmp}/c.yaml: model must be a mapping, got int 32"),
    case("config-wrong-type", *train("--config", "{tmp}/c.yaml"),
         files=yaml_config("train:\n  warmup_steps: many\n"),
         expected="{tmp}/c.yaml: train.warmup_steps must be int, got str 'many'"),
    case("config-dropout-1.5", *train("--config", "{tmp}/c.yaml"),
         files=yaml_config("model:\n  dropout: 1.5\n"),
         expected="{tmp}/c.yaml: model.dropout must be in [0, 1), got 1.5"),
    case("config-negative-max-tokens", *train("--config", "{tmp}/c.yaml"),
         files=yaml_config("data:\n  max_tokens: -100\n"),
         expected="{tmp}/c.yaml: data.max_tokens must be positive, got -100"),
    case("config-d-model-not-divisible-by-heads", *train("--config", "{tmp}/c.yaml"),
         files=yaml_config("model:\n  d_model: 30\n  n_heads: 4\n"),
         expected="{tmp}/c.yaml: model.d_model (30) must be divisible by model.n_heads (4)"),
    case("config-choice-typo", *train("--config", "{tmp}/c.yaml"),
         files=yaml_config("model:\n  norm: pots\n"),
         expected="model.norm must be one of post, pre, rms_pre, got 'pots' (did you mean 'post'?)"),
    case("set-without-equals", *train("--config", TINY, "--set", "model.dropout"),
         expected="--set model.dropout: expected section.key=value"),
    case("set-unknown-section", *train("--config", TINY, "--set", "modle.dropout=0.1"),
         expected="--set modle.dropout=0.1: unknown key 'modle' (did you mean 'model'?)"),
    case("set-unknown-key-typo", *train("--config", TINY, "--set", "train.max_step=5"),
         expected="--set train.max_step=5: unknown key 'train.max_step' (did you mean 'train.max_steps'?)"),
    case("set-into-a-value", *train("--config", TINY, "--set", "run_dir.name=x"),
         expected="--set run_dir.name=x: run_dir is not a section"),
    case("set-unparsable-value", *train("--config", TINY, "--set", "train.adam_betas=[0.9, 0.98"),
         expected="--set train.adam_betas=[0.9, 0.98: cannot parse value"),
    case("corpus-missing", *train("--config", TINY, "--set", "data.train={tmp}/nope"),
         expected="{tmp}/nope.de: file not found"),
    case("corpus-mismatched-line-counts", *train("--config", TINY, "--set", "data.train={tmp}/c"),
         files={"c.de": b"ein Hund\nzwei Hunde\ndrei\n", "c.en": b"a dog\ntwo dogs\n"},
         expected="{tmp}/c.en: has 2 lines but {tmp}/c.de has 3"),
    case("corpus-invalid-utf8", *train("--config", TINY, "--set", "data.train={tmp}/c"),
         files={"c.de": b"ein Hund\nzwei \xc3\x28 Hunde\n", "c.en": b"a dog\ntwo dogs\n"},
         expected="{tmp}/c.de:2: invalid UTF-8"),
    case("corpus-tsv-missing-tab", *train("--config", TINY, "--set", "data.train={tmp}/c.tsv"),
         files={"c.tsv": b"ein Hund\ta dog\nzwei Hunde two dogs\n"},
         expected="{tmp}/c.tsv:2: expected 2 tab-separated fields, found 1"),
    case("dev-corpus-missing", *with_corpus("--set", "data.valid={tmp}/nope"),
         expected="{tmp}/nope.de: file not found"),
    case("resume-without-checkpoint", *with_corpus("--resume"),
         expected="{tmp}/run/checkpoint_last.pt: no checkpoint to resume from"),
    case("run-dir-is-a-file", *with_corpus("--set", "run_dir={tmp}/afile"),
         files={"afile": b"not a directory\n"}, expected="run_dir {tmp}/afile: exists and is not a directory"),
]


@pytest.mark.parametrize("c", TRAIN_CASES)
def test_train_rejects_bad_input(c, pairs, tmp_path, request, capsys):
    check(c, tmp_path, request, capsys)


# ---------------------------------------------------------------------------------------------------------
# mt translate: the checkpoint, the input, the search options, the output


def truncated(ckpt: Path) -> bytes:
    data = ckpt.read_bytes()
    return data[: len(data) // 2]


def other_model(ckpt: Path) -> bytes:
    """The tiny checkpoint relabelled as a model with a wider feed-forward layer (average compares the specs)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["model_spec"]["cfg"]["d_ff"] *= 2
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def other_vocabulary(ckpt: Path) -> bytes:
    """The tiny checkpoint with another SentencePiece model: the same shape, another run's vocabulary."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["vocab"]["src"] = state["vocab"]["src"][:-1] + b"x"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def foreign_torch_file(ckpt: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, buffer)
    return buffer.getvalue()


RANDOM_BYTES = random.Random(0).randbytes(4096)
GOOD_INPUT = {"in.de": "Ein Hund läuft.\nZwei Männer.\n".encode()}


def translate(*args: str, checkpoint: str = "{ckpt}") -> list[str]:
    return ["translate", "--checkpoint", checkpoint, "--device", "cpu", *args]


TRANSLATE_CASES = [
    case("checkpoint-missing", *translate("--input", "{tmp}/in.de", "--output", "{tmp}/out.en",
                                          checkpoint="{tmp}/nope.pt"),
         files=GOOD_INPUT, output=("new", "out.en"), expected="{tmp}/nope.pt: checkpoint not found"),
    case("checkpoint-random-bytes", *translate("--input", "{tmp}/in.de", "--output", "{tmp}/out.en",
                                               checkpoint="{tmp}/random.pt"),
         files={**GOOD_INPUT, "random.pt": RANDOM_BYTES}, output=("old", "out.en"),
         expected="{tmp}/random.pt: not a readable mt checkpoint"),
    case("checkpoint-truncated", *translate("--input", "{tmp}/in.de", "--output", "{tmp}/out.en",
                                            checkpoint="{tmp}/half.pt"),
         files={**GOOD_INPUT, "half.pt": truncated}, output=("new", "out.en"),
         expected="{tmp}/half.pt: not a readable mt checkpoint"),
    case("checkpoint-text-file", *translate("--input", "{tmp}/in.de", checkpoint="{tmp}/in.de"),
         files=GOOD_INPUT, expected="{tmp}/in.de: not a readable mt checkpoint"),
    case("checkpoint-foreign-torch-file", *translate("--input", "{tmp}/in.de", checkpoint="{tmp}/other.pt"),
         files={**GOOD_INPUT, "other.pt": foreign_torch_file}, expected="{tmp}/other.pt: not an mt checkpoint"),
    case("checkpoint-is-a-directory", *translate("--input", "{tmp}/in.de", checkpoint="{tmp}"),
         files=GOOD_INPUT, expected="{tmp}: checkpoint not found"),
    case("input-missing", *translate("--input", "{tmp}/nope.de", "--output", "{tmp}/out.en"),
         output=("new", "out.en"), expected="{tmp}/nope.de: file not found"),
    case("input-invalid-utf8", *translate("--input", "{tmp}/in.de", "--output", "{tmp}/out.en"),
         files={"in.de": b"Ein Hund.\nZwei \xff M\xc3\xa4nner.\n"}, output=("old", "out.en"),
         expected="{tmp}/in.de:2: invalid UTF-8"),
    case("beam-size-0", *translate("--input", "{tmp}/in.de", "--output", "{tmp}/out.en", "--beam-size", "0"),
         files=GOOD_INPUT, output=("new", "out.en"), expected="decode.beam_size must be positive, got 0"),
    case("nbest-above-beam-size", *translate("--input", "{tmp}/in.de", "--beam-size", "2", "--nbest", "3"),
         files=GOOD_INPUT, expected="decode.nbest (3) cannot exceed decode.beam_size (2)"),
    case("negative-max-tokens", *translate("--input", "{tmp}/in.de", "--max-tokens", "-5"),
         files=GOOD_INPUT, expected="decode.max_tokens must not be negative, got -5"),
    case("set-decode-key-typo", *translate("--input", "{tmp}/in.de", "--set", "decode.beam_sise=3"),
         files=GOOD_INPUT, expected="unknown key 'decode.beam_sise' (did you mean 'decode.beam_size'?)"),
    case("unknown-device", *translate("--input", "{tmp}/in.de", "--device", "gpu0"),
         files=GOOD_INPUT, expected="--device gpu0: expected cpu, cuda or cuda:N"),
    case("cuda-device-without-cuda", *translate("--input", "{tmp}/in.de", "--device", "cuda"),
         files=GOOD_INPUT, expected="--device cuda: no CUDA device is available",
         marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")),
    case("output-under-a-regular-file", *translate("--input", "{tmp}/in.de", "--output", "{tmp}/in.de/out.en"),
         files=GOOD_INPUT, expected="{tmp}/in.de/out.en: cannot write here ({tmp}/in.de is not a directory)"),
]


@pytest.mark.parametrize("c", TRANSLATE_CASES)
def test_translate_rejects_bad_input(c, tmp_path, request, capsys):
    check(c, tmp_path, request, capsys)
    if c.files.get("in.de") == GOOD_INPUT["in.de"]:
        assert (tmp_path / "in.de").read_bytes() == GOOD_INPUT["in.de"]  # not overwritten by a bad --output


# ---------------------------------------------------------------------------------------------------------
# mt eval: hypotheses and references, or a checkpoint with --src / -t


HYP_REF = {"hyp.en": b"a dog runs\ntwo men\n", "ref.en": b"a dog is running\ntwo men\n"}

EVAL_CASES = [
    case("hyp-without-ref", "eval", "--hyp", "{tmp}/hyp.en", files=HYP_REF, expected="eval needs --hyp and --ref"),
    case("ref-without-hyp", "eval", "--ref", "{tmp}/ref.en", files=HYP_REF, expected="eval needs --hyp and --ref"),
    case("hyp-missing", "eval", "--hyp", "{tmp}/nope.en", "--ref", "{tmp}/ref.en", files=HYP_REF,
         expected="{tmp}/nope.en: file not found"),
    case("ref-missing", "eval", "--hyp", "{tmp}/hyp.en", "--ref", "{tmp}/nope.en", files=HYP_REF,
         expected="{tmp}/nope.en: file not found"),
    case("hyp-ref-line-count-mismatch", "eval", "--hyp", "{tmp}/hyp.en", "--ref", "{tmp}/ref3.en",
         files={**HYP_REF, "ref3.en": b"a dog\ntwo men\nthree cats\n"},
         expected="{tmp}/ref3.en: has 3 lines but {tmp}/hyp.en has 2"),
    case("second-ref-line-count-mismatch", "eval", "--hyp", "{tmp}/hyp.en", "--ref", "{tmp}/ref.en", "{tmp}/ref1.en",
         files={**HYP_REF, "ref1.en": b"a dog\n"}, expected="{tmp}/ref1.en: has 1 lines but {tmp}/hyp.en has 2"),
    case("hyp-empty", "eval", "--hyp", "{tmp}/empty.en", "--ref", "{tmp}/ref.en",
         files={**HYP_REF, "empty.en": b""}, expected="{tmp}/empty.en: the file is empty"),
    case("ref-invalid-utf8", "eval", "--hyp", "{tmp}/hyp.en", "--ref", "{tmp}/bad.en",
         files={**HYP_REF, "bad.en": b"a dog\ntwo \xe2\x82 men\n"}, expected="{tmp}/bad.en:2: invalid UTF-8"),
    case("test-set-without-language-pair", "eval", "--checkpoint", "{tmp}/nope.pt", "-t", "wmt14",
         expected="-t/--test-set needs -l/--language-pair"),
    case("unknown-test-set", "eval", "--checkpoint", "{tmp}/nope.pt", "-t", "wmt2041", "-l", "en-de",
         expected="test set wmt2041: sacreBLEU test set 'wmt2041' is unknown"),
    case("checkpoint-without-ref", "eval", "--checkpoint", "{tmp}/nope.pt", "--src", "{tmp}/hyp.en",
         files=HYP_REF, expected="eval --checkpoint needs --src and --ref"),
    case("checkpoint-src-ref-mismatch", "eval", "--checkpoint", "{ckpt}", "--device", "cpu", "--src", "{tmp}/in.de",
         "--ref", "{tmp}/ref1.en", "--output", "{tmp}/out.en",
         files={**GOOD_INPUT, "ref1.en": b"a dog\n"}, output=("new", "out.en"),
         expected="{tmp}/ref1.en: has 1 lines but {tmp}/in.de has 2"),
    case("checkpoint-not-a-checkpoint", "eval", "--checkpoint", "{tmp}/hyp.en", "--src", "{tmp}/hyp.en",
         "--ref", "{tmp}/ref.en", "--output", "{tmp}/out.en", files=HYP_REF, output=("old", "out.en"),
         expected="{tmp}/hyp.en: not a readable mt checkpoint"),
]


@pytest.mark.parametrize("c", EVAL_CASES)
def test_eval_rejects_bad_input(c, tmp_path, request, capsys, no_network):
    check(c, tmp_path, request, capsys)
    assert no_network.attempts == []


# ---------------------------------------------------------------------------------------------------------
# mt average


AVERAGE_CASES = [
    case("no-run-dir-or-checkpoints", "average", "--output", "{tmp}/avg.pt", output=("new", "avg.pt"),
         expected="average needs --run-dir (with --last N) or --checkpoints"),
    case("run-dir-without-checkpoints", "average", "--run-dir", "{tmp}/empty", "--output", "{tmp}/avg.pt",
         files={"empty/notes.txt": b"nothing here\n"}, output=("new", "avg.pt"),
         expected="{tmp}/empty: no checkpoint_<step>.pt files to average"),
    case("run-dir-missing", "average", "--run-dir", "{tmp}/nope", expected="{tmp}/nope: no checkpoint_<step>.pt"),
    case("last-0", "average", "--run-dir", "{run}", "--last", "0", "--output", "{tmp}/avg.pt",
         output=("new", "avg.pt"), expected="--last must be at least 1, got 0"),
    case("checkpoint-missing", "average", "--checkpoints", "{ckpt}", "{tmp}/nope.pt", "--output", "{tmp}/avg.pt",
         output=("old", "avg.pt"), expected="{tmp}/nope.pt: checkpoint not found"),
    case("checkpoint-truncated", "average", "--checkpoints", "{ckpt}", "{tmp}/half.pt", "--output", "{tmp}/avg.pt",
         files={"half.pt": truncated}, output=("new", "avg.pt"), expected="{tmp}/half.pt: not a readable mt checkpoint"),
    case("checkpoints-of-different-models", "average", "--checkpoints", "{ckpt}", "{tmp}/wide.pt",
         "--output", "{tmp}/avg.pt", files={"wide.pt": other_model}, output=("new", "avg.pt"),
         expected="{tmp}/wide.pt: a different model shape from {ckpt}"),
    case("checkpoints-of-different-vocabularies", "average", "--checkpoints", "{ckpt}", "{tmp}/other.pt",
         "--output", "{tmp}/avg.pt", files={"other.pt": other_vocabulary}, output=("new", "avg.pt"),
         expected="{tmp}/other.pt: a different SentencePiece vocabulary from {ckpt}"),
    case("last-beyond-the-runs-checkpoints", "average", "--run-dir", "{run}", "--last", "50", "--output",
         "{tmp}/avg.pt", output=("new", "avg.pt"), expected="--last 50 asks for more checkpoints than the"),
]


@pytest.mark.parametrize("c", AVERAGE_CASES)
def test_average_rejects_bad_input(c, tmp_path, request, capsys):
    check(c, tmp_path, request, capsys)

