"""`mt eval`: sacreBLEU scores equal to the sacrebleu command line; test sets through sacreBLEU's cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mt.errors import MTError
from mt.evaluate import read_hyp_ref, score

from conftest import MULTI30K


def perturbed(tmp_path: Path) -> tuple[Path, Path]:
    refs = (MULTI30K / "val.en").read_text(encoding="utf-8").splitlines()[:300]
    hyps = [" ".join(r.split()[:-2] + ["a", "dog"]) if i % 3 else r.lower() for i, r in enumerate(refs)]
    hyp, ref = tmp_path / "hyp.en", tmp_path / "ref.en"
    hyp.write_text("\n".join(hyps) + "\n", encoding="utf-8")
    ref.write_text("\n".join(refs) + "\n", encoding="utf-8")
    return hyp, ref


def sacrebleu_cli(*args: str) -> str:
    exe = Path(sys.executable).with_name("sacrebleu")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=True).stdout


def test_scores_equal_the_sacrebleu_command_line(tmp_path):
    hyp, ref = perturbed(tmp_path)
    bleu, chrf = sacrebleu_cli(str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "-b").split()
    ours = score(*read_hyp_ref(hyp, [ref]))
    assert f"{ours.bleu:.2f}" == f"{float(bleu):.2f}"
    assert f"{ours.chrf:.2f}" == f"{float(chrf):.2f}"
    assert 20 < ours.bleu < 90  # the perturbation leaves a score far from both ends
    cli = subprocess.run([sys.executable, "-m", "mt", "eval", "--hyp", str(hyp), "--ref", str(ref)],
                         capture_output=True, text=True)
    assert cli.stdout.splitlines()[0].startswith(f"BLEU = {float(bleu):.2f}")
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in cli.stdout


@pytest.mark.parametrize("hyp_text, ref_text, message", [
    ("a\nb\n", "a\n", "ref.en: has 1 lines but"),
    ("", "a\n", "hyp.en: the file is empty"),
    ("a\n\xff\n", "a\nb\n", "hyp.en:2: invalid UTF-8"),
])
def test_bad_files_are_one_line_errors(tmp_path, hyp_text, ref_text, message):
    hyp, ref = tmp_path / "hyp.en", tmp_path / "ref.en"
    hyp.write_bytes(hyp_text.encode("latin-1"))
    ref.write_text(ref_text)
    with pytest.raises(MTError, match=message):
        read_hyp_ref(hyp, [ref])
    r = subprocess.run([sys.executable, "-m", "mt", "eval", "--hyp", str(hyp), "--ref", str(ref)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


def test_missing_reference_file_is_a_one_line_error(tmp_path):
    hyp, _ = perturbed(tmp_path)
    with pytest.raises(MTError, match="nope.en: file not found"):
        read_hyp_ref(hyp, [tmp_path / "nope.en"])


def test_eval_translates_then_scores_the_same_as_translate_plus_eval(tiny_checkpoint, tmp_path):
    src, ref = MULTI30K / "val.de", MULTI30K / "val.en"
    head_src, head_ref = tmp_path / "s.de", tmp_path / "r.en"
    head_src.write_text("\n".join(src.read_text().splitlines()[:20]) + "\n")
    head_ref.write_text("\n".join(ref.read_text().splitlines()[:20]) + "\n")
    out = tmp_path / "hyp.en"
    r = subprocess.run([sys.executable, "-m", "mt", "eval", "--checkpoint", str(tiny_checkpoint), "--src",
                        str(head_src), "--ref", str(head_ref), "--output", str(out), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == score(*read_hyp_ref(out, [head_ref])).bleu_verbose


def test_named_test_set_is_read_through_sacrebleus_cache_without_network(tiny_checkpoint, tmp_path):
    # Lay the files out where sacreBLEU's downloader leaves them: $SACREBLEU/wmt14/wmt14.en-de.{src,ref,...}.
    cache = tmp_path / "sacrebleu"
    (cache / "wmt14").mkdir(parents=True)
    src = ["Zwei Männer spielen Fußball.", "Ein Hund läuft."]
    ref = ["Two men play football.", "A dog runs."]
    for field, lines in {"src": src, "ref": ref, "docid": ["d1", "d1"], "genre": ["news"] * 2,
                         "origlang": ["de"] * 2}.items():
        (cache / "wmt14" / f"wmt14.de-en.{field}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {**os.environ, "SACREBLEU": str(cache), "no_proxy": "*", "http_proxy": "http://0.0.0.0:9",
           "https_proxy": "http://0.0.0.0:9"}  # any download attempt would fail loudly
    out = tmp_path / "hyp.en"
    r = subprocess.run([sys.executable, "-m", "mt", "eval", "--checkpoint", str(tiny_checkpoint), "-t", "wmt14",
                        "-l", "de-en", "--output", str(out), "--quiet"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 2
    assert r.stdout.startswith("BLEU = ")
    bad = subprocess.run([sys.executable, "-m", "mt", "eval", "--checkpoint", str(tiny_checkpoint), "-t",
                          "wmt41", "-l", "de-en"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "did you mean 'wmt14'" in bad.stderr
