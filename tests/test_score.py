"""`mt score`: each pair's log-probability, against the training loss and against search's own scores."""

from __future__ import annotations

import pytest
import torch

from mt.checkpoint import load_for_inference
from mt.cli import main
from mt.data import BOS, EOS, PAD
from mt.loss import label_smoothed_loss_reference
from mt.translate import load_translator, translate_nbest

from conftest import MULTI30K


def read(path, n):
    return (MULTI30K / path).read_text(encoding="utf-8").splitlines()[:n]


def test_scores_equal_minus_the_unsmoothed_training_loss_of_each_pair(tiny_checkpoint, tmp_path):
    sources, targets = read("val.de", 15), read("val.en", 15)
    targets[3] = ""  # an empty target: the probability of EOS alone
    src, tgt, out = tmp_path / "s.de", tmp_path / "t.en", tmp_path / "scores.tsv"
    src.write_text("\n".join(sources) + "\n", encoding="utf-8")
    tgt.write_text("\n".join(targets) + "\n", encoding="utf-8")
    assert main(["score", "--checkpoint", str(tiny_checkpoint), "--src", str(src), "--tgt", str(tgt),
                 "--output", str(out), "--max-tokens", "64", "--quiet"]) == 0
    rows = [tuple(map(float, line.split("\t"))) for line in out.read_text().splitlines()]
    assert len(rows) == 15
    model, vocab, _ = load_for_inference(tiny_checkpoint)
    for (total, per_token), s, t in zip(rows, sources, targets):
        # One pair at a time through the loss that training uses (label smoothing 0: the plain NLL).
        ids = vocab.tgt.encode(t)
        with torch.no_grad():
            logits = model(torch.tensor([vocab.src.encode(s) + [EOS]]), torch.tensor([[BOS] + ids]))
            _, nll = label_smoothed_loss_reference(logits.view(-1, logits.size(-1)), torch.tensor(ids + [EOS]),
                                                   0.0, PAD)
        assert total == pytest.approx(-nll.item(), abs=2e-3)
        assert per_token == pytest.approx(total / (len(ids) + 1), abs=2e-3)


def test_a_greedy_translation_scores_what_greedy_search_said(copy_checkpoint, tmp_path):
    from conftest import write_copy_task

    sources = write_copy_task(tmp_path / "copy", 8, seed=4).with_suffix(".src").read_text().splitlines()
    t = load_translator(copy_checkpoint, search_overrides=["decode.method=greedy"])
    hyps = [nbest[0] for nbest in translate_nbest(t, sources)]
    src, tgt, out = tmp_path / "s.de", tmp_path / "t.en", tmp_path / "scores.tsv"
    src.write_text("\n".join(sources) + "\n", encoding="utf-8")
    # Text round trip: pieces -> text -> pieces may differ from the search's pieces; keep the lines where not.
    keep = [i for i, h in enumerate(hyps) if t.vocab.tgt.encode(h.text) == h.tokens]
    assert len(keep) >= 6
    tgt.write_text("\n".join(h.text for h in hyps) + "\n", encoding="utf-8")
    assert main(["score", "--checkpoint", str(copy_checkpoint), "--src", str(src), "--tgt", str(tgt),
                 "--output", str(out), "--quiet"]) == 0
    totals = [float(line.split("\t")[0]) for line in out.read_text().splitlines()]
    for i in keep:
        assert totals[i] == pytest.approx(hyps[i].log_prob, abs=2e-3)


def test_files_of_different_lengths_are_a_one_line_error_and_write_nothing(tiny_checkpoint, tmp_path, capsys):
    src, tgt, out = tmp_path / "s.de", tmp_path / "t.en", tmp_path / "scores.tsv"
    src.write_text("a\nb\nc\n", encoding="utf-8")
    tgt.write_text("a\nb\n", encoding="utf-8")
    assert main(["score", "--checkpoint", str(tiny_checkpoint), "--src", str(src), "--tgt", str(tgt),
                 "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(src) in err and "more lines" in err
    assert not out.exists()
