"""`mt translate`: one line out per line in, input order kept, empty and long lines, stdin, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mt import translate as translate_module
from mt.cli import main
from mt.fast import BF16CPULinear
from mt.translate import load_translator, translate_lines, translate_nbest

from conftest import MULTI30K


def run_cli(*args, stdin: bytes | None = None):
    return subprocess.run([sys.executable, "-m", "mt", *args], input=stdin, capture_output=True)


def test_output_keeps_line_count_and_order_with_empty_and_overlong_lines(tiny_checkpoint, tmp_path):
    lines = (MULTI30K / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:12]
    overlong = " ".join(lines * 6)  # far beyond the training length limit (data.max_len 64)
    lines = [lines[0], "", lines[1], "   ", overlong, *lines[2:]]
    src = tmp_path / "in.de"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.en"
    assert main(["translate", "--checkpoint", str(tiny_checkpoint), "--input", str(src), "--output", str(out),
                 "--quiet"]) == 0
    got = out.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(got) == len(lines)
    assert got[1] == "" and got[3] == ""
    # The over-long line is searched, not dropped: it has a hypothesis with a log-probability (an undertrained
    # model's may be empty), where a skipped line gets ("", 0.0).
    t = load_translator(tiny_checkpoint)
    best = translate_nbest(t, [overlong])[0][0]
    assert best.score < 0 and got[4] == best.text
    # Order: each line translated on its own gives the line at the same position.
    for i in (0, 2, 5, len(lines) - 1):
        assert translate_lines(t, [lines[i]]) == [got[i]]


def test_stdin_is_streamed_in_chunks_with_the_same_result(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    lines = (MULTI30K / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:10]
    src = tmp_path / "in.de"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    whole = run_cli("translate", "--checkpoint", str(tiny_checkpoint), "--quiet",
                    stdin=src.read_bytes())
    assert whole.returncode == 0, whole.stderr
    monkeypatch.setattr(translate_module, "CHUNK_LINES", 3)  # 4 chunks instead of 1
    out = tmp_path / "out.en"
    assert main(["translate", "--checkpoint", str(tiny_checkpoint), "--input", str(src), "--output", str(out),
                 "--quiet"]) == 0
    assert out.read_bytes() == whole.stdout
    assert whole.stdout.count(b"\n") == 10


def test_bf16_search_runs_in_bf16_and_agrees_with_fp32(tiny_checkpoint):
    import torch

    from mt.translate import search

    lines = (MULTI30K / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:40]
    fp32 = load_translator(tiny_checkpoint, device="cpu")
    bf16 = load_translator(tiny_checkpoint, search_overrides=["decode.precision=bf16"], device="cpu")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert type(bf16.model.output) is BF16CPULinear  # a few matrix shapes for oneDNN on a CPU
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    ids = [x + [3] for x in fp32.vocab.src.encode(lines)]  # + EOS
    src = torch.tensor([x + [0] * (max(map(len, ids)) - len(x)) for x in ids])
    a, b = search(fp32.model, src, fp32.decode), search(bf16.model, src, bf16.decode)
    def hyp(out, i):
        return out.tokens[i, 0, :out.lengths[i, 0]].tolist()

    same = [i for i in range(len(lines)) if hyp(a, i) == hyp(b, i)]
    assert len(same) >= 0.75 * len(lines)  # an undertrained model has near-ties that bf16 can flip
    # The same hypothesis gets nearly the same log-probability: bf16 weights, float32 log-softmax.
    torch.testing.assert_close(b.scores[same], a.scores[same], rtol=0.01, atol=0.05)
    assert not torch.equal(b.scores[same], a.scores[same])  # and it was computed differently


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_searches_in_bf16_only_where_it_is_native(tiny_checkpoint, monkeypatch, native):
    import torch

    import mt.runtime

    monkeypatch.setattr(mt.runtime, "native_bf16", lambda device: native)
    t = load_translator(tiny_checkpoint, search_overrides=["decode.precision=auto"], device="cpu")
    assert {p.dtype for p in t.model.parameters()} == {torch.bfloat16 if native else torch.float32}


def test_nbest_lists_give_n_scored_hypotheses_per_line(tiny_checkpoint, tmp_path):
    src = tmp_path / "in.de"
    src.write_text("Ein Hund läuft.\nZwei Männer.\n", encoding="utf-8")
    r = run_cli("translate", "--checkpoint", str(tiny_checkpoint), "--input", str(src), "--beam-size", "3",
                "--nbest", "3", "--quiet")
    rows = [line.split(" ||| ") for line in r.stdout.decode().splitlines()]
    assert [int(row[0]) for row in rows] == [0, 0, 0, 1, 1, 1]
    for line in (rows[:3], rows[3:]):
        scores = [float(row[2]) for row in line]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("content, message", [
    (b"gut\n\xff\xfe kaputt\n", "in.de:2: invalid UTF-8"),
])
def test_bad_input_is_a_one_line_error(tiny_checkpoint, tmp_path, content, message):
    src = tmp_path / "in.de"
    src.write_bytes(content)
    out = tmp_path / "out.en"
    out.write_text("earlier output\n")
    r = run_cli("translate", "--checkpoint", str(tiny_checkpoint), "--input", str(src), "--output", str(out))
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2
    assert err[-1].startswith("mt: error:") and message in err[-1]
    assert "Traceback" not in r.stderr.decode()
    assert out.read_text() == "earlier output\n"  # nothing already written is lost


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    r = run_cli("translate", "--checkpoint", str(tmp_path / "nope.pt"))
    assert r.returncode == 2
    assert r.stderr.decode().strip() == f"mt: error: {tmp_path / 'nope.pt'}: checkpoint not found"


def test_int8_search_quantizes_the_linear_layers_and_agrees_with_fp32(tiny_checkpoint):
    lines = (MULTI30K / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:40]
    fp32 = load_translator(tiny_checkpoint, search_overrides=["decode.method=greedy"], device="cpu")
    int8 = load_translator(tiny_checkpoint, search_overrides=["decode.method=greedy", "decode.precision=int8"],
                           device="cpu")
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    kinds = {type(m) for m in int8.model.modules()}
    assert Int8Linear in kinds and torch.nn.Linear not in kinds
    a, b = translate_lines(fp32, lines), translate_lines(int8, lines)
    # int8 weights may flip the near-ties of an undertrained model, but not most outputs.
    assert sum(x == y for x, y in zip(a, b)) >= 0.6 * len(lines)


def test_int8_search_on_a_torch_without_its_quantization_module_is_a_one_line_error(tiny_checkpoint, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # importing it now raises ImportError
    assert main(["translate", "--checkpoint", str(tiny_checkpoint), "--input", "-", "--output",
                 str(tmp_path / "out"), "--precision", "int8", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "int8" in err and "torch.ao.quantization" in err and "fp32 or bf16" in err
    assert not (tmp_path / "out").exists()


def test_bf16_search_without_native_bf16_warns_in_one_line(tiny_checkpoint, monkeypatch, caplog):
    import mt.runtime

    for module in (translate_module, mt.runtime):  # as on a CPU without AVX512-BF16 or AMX
        monkeypatch.setattr(module, "native_bf16", lambda device: False)
    with caplog.at_level("WARNING", logger="mt.translate"):
        load_translator(tiny_checkpoint, search_overrides=["decode.precision=bf16"], device="cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "slower than fp32" in warnings[0] and "\n" not in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mt.translate"):
        load_translator(tiny_checkpoint, search_overrides=["decode.precision=auto"], device="cpu")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # auto picks fp32 there, silently


# ---- ensembles, prefixes, alignments, n-best formats, line by line


def test_alignments_are_in_range_and_monotone_on_a_model_trained_to_copy(copy_checkpoint, tmp_path):
    from conftest import write_copy_task

    src = write_copy_task(tmp_path / "test", 40, seed=3).with_suffix(".src")
    out = tmp_path / "out.txt"
    assert main(["translate", "--checkpoint", str(copy_checkpoint), "--input", str(src), "--output", str(out),
                 "--alignment", "--quiet"]) == 0
    sources = src.read_text().splitlines()
    rows = [line.split(" ||| ") for line in out.read_text().splitlines()]
    assert len(rows) == len(sources) and all(len(r) == 2 for r in rows)
    monotone = diagonal = 0
    for source, (text, alignment) in zip(sources, rows):
        pairs = [tuple(map(int, p.split("-"))) for p in alignment.split()]
        # In range: every word index names a word of its sentence, and each target word gets one link.
        assert all(0 <= i < len(source.split()) and 0 <= j < len(text.split()) for i, j in pairs)
        assert sorted(j for _, j in pairs) == list(range(len(text.split())))
        links = [i for i, _ in sorted(pairs, key=lambda p: p[1])]
        monotone += links == sorted(links)
        diagonal += text == source and all(i == j for i, j in pairs)
    # Thresholds leave room for the numerics of other thread counts (31 of 40 diagonal with one thread).
    assert monotone >= 36 and diagonal >= 26, (monotone, diagonal)


def test_prefix_appears_verbatim_at_the_start_of_every_output(tiny_checkpoint, tmp_path):
    lines = (MULTI30K / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:6]
    prefixes = ["A man", "", "Two dogs are", "The", "", "A little girl in a pink dress"]
    src, pre, out = tmp_path / "in.de", tmp_path / "prefix.en", tmp_path / "out.en"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pre.write_text("\n".join(prefixes) + "\n", encoding="utf-8")
    for method in ("beam", "greedy"):
        assert main(["translate", "--checkpoint", str(tiny_checkpoint), "--input", str(src), "--prefix", str(pre),
                     "--output", str(out), "--method", method, "--quiet"]) == 0
        got = out.read_text(encoding="utf-8").splitlines()
        assert len(got) == 6
        for text, prefix in zip(got, prefixes):
            assert text.startswith(prefix)
        # An empty prefix constrains nothing: those lines are the unconstrained translations.
        free = load_translator(tiny_checkpoint, search_overrides=[f"decode.method={method}"])
        assert [got[1], got[4]] == translate_lines(free, [lines[1], lines[4]])


def test_a_prefix_file_of_another_length_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    src, pre = tmp_path / "in.de", tmp_path / "prefix.en"
    src.write_text("ein Hund\nzwei Hunde\n", encoding="utf-8")
    pre.write_text("A\n", encoding="utf-8")
    assert main(["translate", "--checkpoint", str(tiny_checkpoint), "--input", str(src), "--prefix", str(pre),
                 "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(pre) in err and "fewer prefix lines" in err
    assert not (tmp_path / "out").exists()


def test_an_ensemble_of_a_checkpoint_with_itself_equals_the_checkpoint(tiny_checkpoint, tmp_path):
    src = tmp_path / "in.de"
    src.write_text("\n".join((MULTI30K / "val.de").read_text(encoding="utf-8").splitlines()[:12]) + "\n")
    outputs = []
    for checkpoints in ([tiny_checkpoint], [tiny_checkpoint, tiny_checkpoint]):
        out = tmp_path / f"out{len(checkpoints)}"
        assert main(["translate", "--checkpoint", *map(str, checkpoints), "--input", str(src), "--output", str(out),
                     "--nbest", "2", "--quiet"]) == 0
        outputs.append([line.split(" ||| ") for line in out.read_text().splitlines()])
    alone, pair = outputs
    assert [r[:2] for r in alone] == [r[:2] for r in pair]
    assert all(abs(float(a[2]) - float(b[2])) < 1e-3 for a, b in zip(alone, pair))


def test_an_ensemble_of_checkpoints_with_different_vocabularies_is_refused(tiny_checkpoint, copy_checkpoint, capsys):
    assert main(["translate", "--checkpoint", str(tiny_checkpoint), str(copy_checkpoint), "--input", "-",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(copy_checkpoint) in err and "vocabulary" in err


def test_nbest_formats_moses_and_json_carry_the_same_hypotheses(tiny_checkpoint, tmp_path):
    import json

    from mt.search import length_penalty

    src = tmp_path / "in.de"
    src.write_text("ein Mann fährt Fahrrad .\n\nzwei Hunde spielen im Schnee .\n", encoding="utf-8")
    texts = {}
    for fmt in ("plain", "moses", "json"):
        out = tmp_path / f"out.{fmt}"
        assert main(["translate", "--checkpoint", str(tiny_checkpoint), "--input", str(src), "--output", str(out),
                     "--nbest", "2", "--nbest-format", fmt, "--alignment", "--quiet"]) == 0
        texts[fmt] = out.read_text(encoding="utf-8").splitlines()
    # Two hypotheses for each sentence, one (empty) for the empty line.
    assert len(texts["plain"]) == len(texts["moses"]) == 5 and len(texts["json"]) == 3
    objects = [json.loads(line) for line in texts["json"]]
    assert [o["id"] for o in objects] == [0, 1, 2] and objects[1]["translations"][0]["text"] == ""
    from_json = [(o["id"], t) for o in objects for t in o["translations"]]
    for plain, moses, (number, t) in zip(texts["plain"], texts["moses"], from_json):
        p_id, p_text, p_score, p_align = plain.split(" ||| ")
        m_id, m_text, features, m_score, m_align = moses.split(" ||| ")
        assert int(p_id) == int(m_id) == number and p_text == m_text == t["text"]
        assert p_align == m_align == t["alignment"]
        assert float(p_score) == float(m_score) == pytest.approx(t["score"], abs=1e-4)
        logprob, length = float(features.split()[1]), int(features.split()[3])
        assert length == t["length"] and logprob == pytest.approx(t["log_prob"], abs=1e-4)
        if t["text"]:  # beam search ranks by log P / lp(|Y|) (alpha of tiny.yaml: the default 0.6)
            lp = float(length_penalty(torch.tensor(length), 0.6))
            assert t["score"] == pytest.approx(t["log_prob"] / lp, abs=1e-3)


def test_buffer_lines_1_answers_each_line_before_the_next_is_written(tiny_checkpoint):
    proc = subprocess.Popen([sys.executable, "-m", "mt", "translate", "--checkpoint", str(tiny_checkpoint),
                             "--buffer-lines", "1", "--quiet"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    expected = translate_lines(load_translator(tiny_checkpoint), ["ein Hund läuft .", "zwei Männer ."])
    try:
        for line, want in zip(["ein Hund läuft .", "zwei Männer ."], expected):
            proc.stdin.write((line + "\n").encode())
            proc.stdin.flush()  # stdin stays open: the answer must come without end of input
            assert proc.stdout.readline().decode().rstrip("\n") == want
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0


def test_a_file_without_a_terminal_logs_lines_per_second_and_the_eta_per_chunk(tiny_checkpoint, tmp_path,
                                                                               monkeypatch, caplog):
    import io
    import re

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar, a log line per chunk
    monkeypatch.setattr(translate_module, "CHUNK_LINES", 10)
    lines = (MULTI30K / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:25]
    src = tmp_path / "in.de"
    src.write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n", encoding="utf-8")  # 26 lines, one empty
    batches = []
    translator = load_translator(tiny_checkpoint, device="cpu")
    assert len(translate_nbest(translator, lines[:5], on_batch=batches.append)) == 5 and sum(batches) == 5
    with caplog.at_level("INFO", logger="mt.translate"):
        assert translate_module.translate_stream(translator, str(src), str(tmp_path / "out.en")) == 26
    progress = [m for m in caplog.messages if m.startswith("translated ")]
    assert [m.split(",")[0] for m in progress] == [f"translated {n} of 26 lines" for n in (10, 20, 26)]
    assert all(re.fullmatch(r"translated \d+ of 26 lines, [\d.]+ lines/s, ETA \d\d:\d\d", m) for m in progress)
