"""mt.evaluate: scores equal to the sacrebleu command line; bad files are one-line errors; test sets by name
come through sacreBLEU's own cache code, here filled by hand so that nothing touches the network."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from mt.cli import main
from mt.errors import MTError
from mt.evaluate import load_test_set, read_hyp_ref, score

from conftest import MULTI30K

SACREBLEU_CLI = Path(sys.executable).with_name("sacrebleu")


def sacrebleu_cli(*args: str, env: dict | None = None) -> str:
    return subprocess.run([str(SACREBLEU_CLI), *args], capture_output=True, text=True, check=True,
                          env=env).stdout


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def perturbed(tmp_path: Path, n: int = 300) -> tuple[Path, Path, Path]:
    """Hypotheses made from Multi30k references: some exact, some lower-cased, some with the end replaced
    (a few with trailing spaces, which the CLI strips and BLEU/chrF must ignore); and a second reference."""
    refs = (MULTI30K / "val.en").read_text(encoding="utf-8").splitlines()[:n]
    hyps = [r if i % 5 == 0 else r.lower() if i % 5 == 1 else " ".join(r.split()[:-2] + ["a", "dog"])
            + ("  " if i % 7 == 0 else "") for i, r in enumerate(refs)]
    second = [" ".join(reversed(r.split()[:3])) + " " + " ".join(r.split()[3:]) for r in refs]
    return write(tmp_path / "hyp.en", hyps), write(tmp_path / "ref.en", refs), write(tmp_path / "ref2.en", second)


@pytest.mark.parametrize("nrefs", [1, 2])
def test_scores_and_signatures_equal_the_sacrebleu_command_line(tmp_path, nrefs):
    hyp, *refs = perturbed(tmp_path)
    refs = refs[:nrefs]
    ours = score(*read_hyp_ref(hyp, refs))
    ref_args = [str(r) for r in refs]

    bleu, chrf = json.loads(sacrebleu_cli(*ref_args, "-i", str(hyp), "-m", "bleu", "chrf", "-b", "-w", "2"))
    assert f"{ours.bleu:.2f}" == f"{bleu:.2f}" and f"{ours.chrf:.2f}" == f"{chrf:.2f}"
    assert 20 < ours.bleu < 90 and 20 < ours.chrf < 95  # the perturbation keeps both far from 0 and 100

    # `-f text` prints "BLEU|<signature> = 34.50 65.1/41.0/... (BP = ...)": signature, score and the
    # verbose statistics (brevity penalty, lengths) must all be sacreBLEU's.
    text = sacrebleu_cli(*ref_args, "-i", str(hyp), "-m", "bleu", "chrf", "-f", "text", "-w", "2")
    cli_bleu, cli_chrf = (line.strip() for line in text.splitlines())
    assert cli_bleu == f"BLEU|{ours.bleu_signature} = " + ours.bleu_verbose.removeprefix("BLEU = ")
    assert cli_chrf == f"chrF2|{ours.chrf_signature} = " + ours.chrf_verbose.removeprefix("chrF2 = ")
    assert f"nrefs:{nrefs}|case:mixed|eff:no|tok:13a|smooth:exp|version:" in ours.bleu_signature
    assert ours.format() == [ours.bleu_verbose, f"BLEU|{ours.bleu_signature}",
                             ours.chrf_verbose, f"chrF2|{ours.chrf_signature}"]


def test_target_language_picks_the_tokenizer_the_cli_picks_for_chinese(tmp_path):
    refs = ["我们今天去公园散步。", "这只猫在睡觉。", "他喜欢读书和写字。"]
    hyps = ["我们今天去公园。", "这只猫正在睡觉。", "他喜欢读书。"]
    hyp, ref = write(tmp_path / "hyp.zh", hyps), write(tmp_path / "ref.zh", refs)
    ours = score(hyps, refs, trg_lang="zh")
    cli = sacrebleu_cli(str(ref), "-i", str(hyp), "-l", "en-zh", "-m", "bleu", "-f", "text", "-w", "2").strip()
    assert "tok:zh" in ours.bleu_signature
    assert cli == f"BLEU|{ours.bleu_signature} = " + ours.bleu_verbose.removeprefix("BLEU = ")
    assert score(hyps, refs).bleu != ours.bleu  # 13a sees each sentence as one token: the choice matters


def test_score_rejects_mismatched_or_empty_inputs():
    with pytest.raises(MTError, match="2 hypotheses but 1 lines in reference stream 2 of 2"):
        score(["a b", "c d"], [["a b", "c d"], ["a b"]])
    with pytest.raises(MTError, match="no hypotheses"):
        score([], [[]])
    with pytest.raises(MTError, match="no references"):
        score(["a"], [])


@pytest.mark.parametrize("hyp_bytes, ref_bytes, bad, message", [
    (b"a\nb\n", b"a\n", "ref.en", "has 1 lines but {hyp} has 2"),
    (b"", b"a\n", "hyp.en", "the file is empty"),
    (b"a\n", b"", "ref.en", "the file is empty"),
    (b"a\n\xff\n", b"a\nb\n", "hyp.en", ":2: invalid UTF-8"),
    (b"a\nb\n", b"a\nb\xc3\n", "ref.en", ":2: invalid UTF-8"),
    (None, b"a\n", "hyp.en", "file not found"),
    (b"a\n", None, "ref.en", "file not found"),
])
def test_bad_hypothesis_or_reference_files_are_one_line_errors_naming_the_file(
        tmp_path, hyp_bytes, ref_bytes, bad, message):
    hyp, ref = tmp_path / "hyp.en", tmp_path / "ref.en"
    for path, data in ((hyp, hyp_bytes), (ref, ref_bytes)):
        if data is not None:
            path.write_bytes(data)
    with pytest.raises(MTError) as e:
        read_hyp_ref(hyp, [ref])
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(tmp_path / bad)), text
    assert message.format(hyp=hyp) in text


def test_mt_eval_prints_a_bad_file_as_one_line_and_exits_2(tmp_path):
    hyp, ref = write(tmp_path / "hyp.en", ["a", "b"]), write(tmp_path / "ref.en", ["a"])
    r = subprocess.run([sys.executable, "-m", "mt", "eval", "--hyp", str(hyp), "--ref", str(ref)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert f"{ref}: has 1 lines but {hyp} has 2" in r.stderr


# ---- test sets by name, through sacreBLEU's cache ------------------------------------------------------------

# A few lines in the shape of WMT14's newstest2014 en-de (the text is made up).
SOURCE = ["Gutach: Increased safety for pedestrians", "They are not even 100 metres apart: on Tuesday, the new"
          " B 33 pedestrian lights in Dorfparkplatz in Gutach became operational.", "A third line,  with  spaces."]
REFERENCE = ["Gutach: Noch mehr Sicherheit für Fußgänger", "Sie stehen keine 100 Meter voneinander entfernt: Am"
             " Dienstag ist in Gutach die neue B 33-Fußgängerampel am Dorfparkplatz in Betrieb genommen worden.",
             "Eine dritte Zeile, mit Leerzeichen."]


@dataclass
class Offline:
    cache: Path  # sacreBLEU's cache directory, empty to start with
    attempts: list[str]  # every try at the network, each refused


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Offline:
    """An empty sacreBLEU cache in tmp_path, with the network cut off: any attempt is recorded and fails.

    sacreBLEU reads $SACREBLEU once at import, into `sacrebleu.utils.SACREBLEU_DIR` (copied into
    `sacrebleu.dataset.base`), and every dataset object in `DATASETS` fixes its `_outdir` / `_rawdir` from it
    when the registry is built; in this already-running process all of them are redirected. A fresh process
    only needs the environment variable (see the subprocess test below).
    """
    import sacrebleu.dataset.base
    import sacrebleu.utils
    from sacrebleu.dataset import DATASETS

    cache = tmp_path / "sacrebleu"
    monkeypatch.setenv("SACREBLEU", str(cache))
    monkeypatch.setattr(sacrebleu.utils, "SACREBLEU_DIR", str(cache))
    monkeypatch.setattr(sacrebleu.dataset.base, "SACREBLEU_DIR", str(cache))
    for dataset in DATASETS.values():
        outdir = os.path.join(str(cache), dataset.name)
        monkeypatch.setattr(dataset, "_outdir", outdir)
        monkeypatch.setattr(dataset, "_rawdir", os.path.join(outdir, "raw"))

    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)  # what sacreBLEU's download_file calls
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return Offline(cache, attempts)


def lay_out_processed_wmt14(cache: Path, langpair: str = "en-de") -> None:
    """What sacreBLEU leaves after its first use of wmt14: one plain text file per field in
    $SACREBLEU/wmt14/wmt14.<langpair>.<field>. `get_files` checks only that every field's file exists (no
    checksum), so all five fields must be there: src, ref and the document metadata docid, genre, origlang."""
    fields = {"src": SOURCE, "ref": REFERENCE, "docid": ["1012-bz"] * 3, "genre": ["news"] * 3,
              "origlang": ["de"] * 3}
    (cache / "wmt14").mkdir(parents=True)
    for field, lines in fields.items():
        write(cache / "wmt14" / f"wmt14.{langpair}.{field}", lines)


def sgm(lines: list[str], kind: str, lang: str) -> bytes:
    segs = "".join(f'<seg id="{i}">{line}</seg>\n' for i, line in enumerate(lines, start=1))
    return (f'<{kind} setid="newstest2014" srclang="any" trglang="{lang}">\n'
            f'<doc sysid="ref" docid="1012-bz" genre="news" origlang="de">\n<p>\n{segs}</p>\n</doc>\n</{kind}>\n'
            ).encode("utf-8")


def test_load_test_set_reads_sacrebleus_processed_cache_in_order(offline):
    lay_out_processed_wmt14(offline.cache)
    sources, refs = load_test_set("wmt14", "en-de")
    assert sources == SOURCE and refs == [REFERENCE]
    assert offline.attempts == []


def test_load_test_set_runs_sacrebleus_own_sgml_extraction_on_a_downloaded_tarball(offline):
    # What sacreBLEU's downloader leaves: the tarball at raw/<name>.<basename of the URL>, extracted beside it.
    # `download_file` skips any URL whose tarball exists and is non-empty, and checks the MD5 only right after
    # downloading, so a tarball of made-up files passes; sacreBLEU then converts the SGML to text itself.
    raw = offline.cache / "wmt14" / "raw"
    files = {"test/newstest2014-deen-src.en.sgm": sgm(SOURCE, "srcset", "en"),
             "test/newstest2014-deen-ref.de.sgm": sgm(REFERENCE, "refset", "de")}
    (raw / "test").mkdir(parents=True)
    with tarfile.open(raw / "wmt14.test-filtered.tgz", "w:gz") as tar:
        for name, data in files.items():
            (raw / name).write_bytes(data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sources, refs = load_test_set("wmt14", "en-de")
    assert sources == [" ".join(s.split()) for s in SOURCE]  # sacreBLEU collapses runs of spaces
    assert refs == [[" ".join(r.split()) for r in REFERENCE]]
    assert (offline.cache / "wmt14" / "wmt14.en-de.src").is_file()  # and it cached its conversion
    assert offline.attempts == []


def test_a_failed_download_is_an_error_naming_the_cache(offline):
    with pytest.raises(MTError) as e:
        load_test_set("wmt14", "en-de")
    assert len(offline.attempts) == 1  # the empty cache sent sacreBLEU to the (refused) network
    message = str(e.value)
    assert "download" in message and "failed" in message and str(offline.cache) in message and "\n" not in message


@pytest.mark.parametrize("name, langpair, message", [
    ("wmt-14", "en-de", "sacreBLEU test set 'wmt-14' is unknown; did you mean 'wmt14'? (valid: iwslt17, "),
    ("WMT2014", "en-de", "sacreBLEU test set 'WMT2014' is unknown; did you mean 'wmt14'? (valid: iwslt17, "),
    ("wmt14", "en-dee", "language pair 'en-dee' is unknown; did you mean 'en-de'? (valid: cs-en, de-en, "),
    ("wmt14", "xx-yy", "language pair 'xx-yy' is unknown (valid: cs-en, de-en, "),
])
def test_unknown_test_set_or_language_pair_lists_the_choices_with_a_suggestion(offline, name, langpair, message):
    with pytest.raises(MTError) as e:
        load_test_set(name, langpair)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert offline.attempts == []


def test_a_fresh_process_finds_the_cache_through_the_environment_like_sacrebleus_cli(tmp_path):
    # Through $SACREBLEU alone, as a user sets it; proxies that lead nowhere make any download fail at once.
    cache = tmp_path / "sacrebleu"
    lay_out_processed_wmt14(cache)
    env = {**os.environ, "SACREBLEU": str(cache), "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    code = ("import json; from mt.evaluate import load_test_set, score; s, r = load_test_set('wmt14', 'en-de');"
            "print(json.dumps([s, r, score(s, r).bleu]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    sources, refs, bleu = json.loads(r.stdout)
    assert sources == sacrebleu_cli("-t", "wmt14", "-l", "en-de", "--echo", "src", env=env).splitlines()
    assert refs == [sacrebleu_cli("-t", "wmt14", "-l", "en-de", "--echo", "ref", env=env).splitlines()]
    # Scoring the sources as if they were translations: the same number as sacreBLEU's -t mode.
    hyp = write(tmp_path / "hyp.de", sources)
    cli = json.loads(sacrebleu_cli("-t", "wmt14", "-l", "en-de", "-i", str(hyp), "-m", "bleu", "-b", "-w", "2",
                                   env=env))
    assert f"{bleu:.2f}" == f"{cli:.2f}"


# ---- `mt eval` end to end (a tiny trained checkpoint) ---------------------------------------------------------

def test_mt_eval_with_a_checkpoint_prints_the_scores_of_its_own_translations(tiny_checkpoint, tmp_path):
    head_src = write(tmp_path / "s.de", (MULTI30K / "val.de").read_text(encoding="utf-8").splitlines()[:5])
    head_ref = write(tmp_path / "r.en", (MULTI30K / "val.en").read_text(encoding="utf-8").splitlines()[:5])
    out = tmp_path / "hyp.en"
    r = subprocess.run([sys.executable, "-m", "mt", "eval", "--checkpoint", str(tiny_checkpoint), "--src",
                        str(head_src), "--ref", str(head_ref), "--output", str(out), "--quiet", "--method", "greedy"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == score(*read_hyp_ref(out, [head_ref])).format()


def test_mt_eval_with_a_named_test_set_reads_sacrebleus_cache_without_network(tiny_checkpoint, tmp_path):
    cache = tmp_path / "sacrebleu"
    lay_out_processed_wmt14(cache, "de-en")
    env = {**os.environ, "SACREBLEU": str(cache), "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    out = tmp_path / "hyp.en"
    r = subprocess.run([sys.executable, "-m", "mt", "eval", "--checkpoint", str(tiny_checkpoint), "-t", "wmt14",
                        "-l", "de-en", "--output", str(out), "--quiet", "--method", "greedy"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(SOURCE)
    assert r.stdout.splitlines()[0].startswith("BLEU = ")
    bad = subprocess.run([sys.executable, "-m", "mt", "eval", "--checkpoint", str(tiny_checkpoint), "-t",
                          "WMT2014", "-l", "de-en"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "did you mean 'wmt14'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_mt_eval_of_an_ensemble_of_a_checkpoint_with_itself_scores_as_the_checkpoint(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint.parent, run)
    (run / "scores.jsonl").unlink(missing_ok=True)
    src = write(tmp_path / "s.de", (MULTI30K / "val.de").read_text(encoding="utf-8").splitlines()[:8])
    ref = write(tmp_path / "r.en", (MULTI30K / "val.en").read_text(encoding="utf-8").splitlines()[:8])
    ckpt = str(run / "checkpoint_avg.pt")
    for checkpoints in ([ckpt], [ckpt, ckpt]):
        assert main(["eval", "--checkpoint", *checkpoints, "--src", str(src), "--ref", str(ref), "--quiet"]) == 0
    alone, pair = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    assert alone["checkpoint"] == "checkpoint_avg.pt" and pair["checkpoint"] == f"{ckpt} + {ckpt}"
    assert pair["bleu"] == alone["bleu"] and pair["chrf"] == alone["chrf"]
