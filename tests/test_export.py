"""`mt export`: every exported model decodes exactly as mt does, scores as mt does, and a failed export
leaves nothing behind.

The references are mt's own search and its teacher-forced log-probabilities; the exported models run in
their own engines (CTranslate2's C++, transformers' MarianMTModel, onnxruntime).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mt.checkpoint import load_for_inference
from mt.cli import main
from mt.model import sinusoids
from mt.search import max_lengths
from mt.translate import load_translator, translate_lines

from conftest import MULTI30K, ROOT, write_pairs

# MarianTokenizer recommends sacremoses, which would normalise punctuation mt never normalised.
pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

SOURCES = (MULTI30K / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:40]


def train_variant(tmp: Path, norm: str) -> Path:
    """A tiny model with the options the paper's model does not have: separate vocabularies, an untied output
    projection, fewer decoder than encoder layers, and `norm`."""
    prefix = write_pairs(tmp / "pairs", 200)
    assert main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--quiet",
                 "--set", f"run_dir={tmp / 'run'}", "--set", f"data.train={prefix}", "--set", f"data.valid={prefix}",
                 "--set", "train.max_steps=30", "--set", "train.validate_every=30", "--set", "train.save_every=15",
                 "--set", f"model.norm={norm}", "--set", "data.joint_vocab=false",
                 "--set", "model.tie_embeddings=false", "--set", "model.n_decoder_layers=1"]) == 0
    return tmp / "run" / "checkpoint_avg.pt"


@pytest.fixture(scope="module")
def variant_checkpoint(tmp_path_factory) -> Path:
    """Pre-norm, separate vocabularies, untied, 2 + 1 layers."""
    return train_variant(tmp_path_factory.mktemp("variant-run"), "pre")


@pytest.fixture(scope="module")
def post_variant_checkpoint(tmp_path_factory) -> Path:
    """Post-norm (what Marian can express), separate vocabularies, untied, 2 + 1 layers."""
    return train_variant(tmp_path_factory.mktemp("post-variant-run"), "post")


def export(checkpoint: Path, fmt: str, output: Path, *extra: str) -> Path:
    assert main(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--output", str(output), "--quiet",
                 *extra]) == 0
    return output


def mt_greedy(checkpoint: Path) -> list[str]:
    return translate_lines(load_translator(checkpoint, search_overrides=["decode.method=greedy"]), SOURCES)


def limits(checkpoint: Path) -> list[int]:
    """mt's output limit of each source line, EOS included."""
    t = load_translator(checkpoint)
    return [int(max_lengths(torch.tensor([t.vocab.src.encode(s) + [3]]), 0, t.decode.max_len_a,
                            t.decode.max_len_b)[0]) for s in SOURCES]


def mt_log_probs(checkpoint: Path, sources: list[str], targets: list[str]) -> list[torch.Tensor]:
    """mt's teacher-forced log-probability of each target piece and the final EOS, one sentence at a time."""
    model, vocab, _ = load_for_inference(checkpoint)
    out = []
    for s, t in zip(sources, targets):
        tgt = vocab.tgt.encode(t)
        with torch.no_grad():
            lp = model(torch.tensor([vocab.src.encode(s) + [3]]), torch.tensor([[2] + tgt])).log_softmax(-1)[0]
        out.append(lp[torch.arange(len(tgt) + 1), torch.tensor(tgt + [3])])
    return out


# ---- CTranslate2


@pytest.mark.parametrize("which", ["paper", "variant"])
def test_ct2_greedy_and_log_probs_equal_mt(which, tiny_checkpoint, variant_checkpoint, tmp_path):
    import ctranslate2

    checkpoint = tiny_checkpoint if which == "paper" else variant_checkpoint
    directory = export(checkpoint, "ct2", tmp_path / "ct2")
    vocab = load_translator(checkpoint).vocab
    translator = ctranslate2.Translator(str(directory))
    pieces = [vocab.src.encode(s, out_type=str) for s in SOURCES]
    # CTranslate2's limit counts the tokens before EOS; mt's counts EOS too.
    got = [vocab.tgt.decode(translator.translate_batch([p], beam_size=1, max_decoding_length=limit - 1)[0]
                            .hypotheses[0]) for p, limit in zip(pieces, limits(checkpoint))]
    want = mt_greedy(checkpoint)
    assert got == want
    targets = want[:8]
    scored = translator.score_batch(pieces[:8], [vocab.tgt.encode(t, out_type=str) for t in targets])
    for ours, theirs in zip(mt_log_probs(checkpoint, SOURCES[:8], targets), scored):
        assert torch.allclose(ours, torch.tensor(theirs.log_probs), atol=1e-4, rtol=0)


def test_ct2_int8_runs_close_to_float32(tiny_checkpoint, tmp_path):
    import ctranslate2

    directory = export(tiny_checkpoint, "ct2", tmp_path / "int8", "--quantization", "int8")
    assert json.loads((directory / "config.json").read_text())["add_source_eos"] is True
    vocab = load_translator(tiny_checkpoint).vocab
    targets = mt_greedy(tiny_checkpoint)[:8]
    scored = ctranslate2.Translator(str(directory)).score_batch(
        [vocab.src.encode(s, out_type=str) for s in SOURCES[:8]], [vocab.tgt.encode(t, out_type=str) for t in targets])
    ours = torch.cat(mt_log_probs(tiny_checkpoint, SOURCES[:8], targets))
    theirs = torch.tensor([x for r in scored for x in r.log_probs])
    # int8 weights move log-probabilities, but not far; float32 weights would agree to 1e-6.
    assert 1e-6 < (ours - theirs).abs().max() < 0.5


# ---- Hugging Face


def test_halves_order_maps_mts_sinusoids_onto_marians_table():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    from mt.export.hf import halves_order

    for d in (8, 32, 512):
        marian = MarianSinusoidalPositionalEmbedding(100, d).create_weight()
        assert torch.allclose(sinusoids(100, d)[:, halves_order(d)], marian, atol=1e-6)
        assert not torch.allclose(sinusoids(100, d), marian, atol=1e-3)  # the layouts do differ


@pytest.mark.parametrize("which", ["paper", "variant"])
def test_hf_greedy_and_log_probs_equal_mt_offline(which, tiny_checkpoint, post_variant_checkpoint, tmp_path,
                                                  no_network):
    from transformers import MarianMTModel, MarianTokenizer

    checkpoint = tiny_checkpoint if which == "paper" else post_variant_checkpoint
    directory = export(checkpoint, "hf", tmp_path / "hf")
    tokenizer = MarianTokenizer.from_pretrained(directory)
    model = MarianMTModel.from_pretrained(directory).eval()
    want = mt_greedy(checkpoint)
    got = []
    for s, limit in zip(SOURCES, limits(checkpoint)):
        batch = tokenizer([s], return_tensors="pt")
        with torch.no_grad():  # max_length counts the start token; forced_eos_token_id ends it as mt's limit does
            out = model.generate(**batch, num_beams=1, do_sample=False, max_length=limit + 1)
        got.append(tokenizer.batch_decode(out, skip_special_tokens=True)[0])
    assert got == want
    for s, t, ours in zip(SOURCES[:8], want[:8], mt_log_probs(checkpoint, SOURCES[:8], want[:8])):
        batch = tokenizer([s], text_target=[t], return_tensors="pt")
        labels = batch.pop("labels")
        decoder_input = torch.cat([torch.tensor([[model.config.decoder_start_token_id]]), labels[:, :-1]], 1)
        with torch.no_grad():
            lp = model(**batch, decoder_input_ids=decoder_input).logits.log_softmax(-1)[0]
        assert torch.allclose(lp.gather(1, labels[0, :, None])[:, 0], ours, atol=1e-4, rtol=0)
    assert not no_network.attempts


# ---- ONNX (the graphs themselves are tested in test_export_onnx.py; here, the command's output)


@pytest.mark.parametrize("which", ["paper", "variant"])
def test_onnx_greedy_and_log_probs_equal_mt(which, tiny_checkpoint, variant_checkpoint, tmp_path):
    from mt.export.onnx import OnnxModel
    from mt.translate import Translator

    checkpoint = tiny_checkpoint if which == "paper" else variant_checkpoint
    directory = export(checkpoint, "onnx", tmp_path / "onnx")
    t = load_translator(checkpoint, search_overrides=["decode.method=greedy"])
    onnx_model = OnnxModel(directory)
    # mt's own batching and search, over the graphs: only the model differs.
    assert translate_lines(Translator(onnx_model, t.vocab, t.decode, t.device), SOURCES) == mt_greedy(checkpoint)
    targets = mt_greedy(checkpoint)[:8]
    for s, tgt, ours in zip(SOURCES[:8], targets, mt_log_probs(checkpoint, SOURCES[:8], targets)):
        ids = t.vocab.tgt.encode(tgt)
        state = onnx_model.start_decoding(torch.tensor([t.vocab.src.encode(s) + [3]]))
        theirs = [onnx_model.decode_step(torch.tensor([token]), state)[0, nxt]
                  for token, nxt in zip([2] + ids, ids + [3])]
        assert torch.allclose(ours, torch.stack(theirs), atol=1e-4, rtol=0)


# ---- the command: errors, staging, the model card


def test_an_inexpressible_model_is_refused_in_one_line_and_leaves_nothing(variant_checkpoint, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["export", "--checkpoint", str(variant_checkpoint), "--format", "hf", "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.norm: pre" in err and "hf" in err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_kept_without_force_and_replaced_with_it(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "mine.txt").write_text("keep me")
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--format", "ct2", "--output", str(output)]) == 2
    assert "--force" in capsys.readouterr().err and (output / "mine.txt").read_text() == "keep me"
    export(tiny_checkpoint, "ct2", output, "--force")
    assert not (output / "mine.txt").exists() and (output / "model.bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left


def test_a_failure_while_writing_leaves_no_directory(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import mt.export.ct2

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mt.export.ct2, "write_ct2", fail)
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--format", "ct2", "--output",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device" in err and str(tmp_path / "o") in err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_extra_names_the_pip_install(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_ctranslate2(name, *args, **kwargs):
        if name == "ctranslate2":
            raise ImportError("No module named 'ctranslate2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ctranslate2)
    monkeypatch.delitem(__import__("sys").modules, "ctranslate2", raising=False)
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--format", "ct2", "--output",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install -e ".[export]"' in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt, quantization", [("hf", "int8"), ("onnx", "float16")])
def test_a_quantization_the_format_lacks_is_refused(fmt, quantization, tiny_checkpoint, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--format", fmt, "--quantization", quantization,
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and quantization in err and fmt in err
    assert list(tmp_path.iterdir()) == []


def test_the_model_card_carries_the_runs_scores_and_the_command(tiny_checkpoint, tmp_path, capsys):
    src, ref = tmp_path / "t.de", tmp_path / "t.en"
    write_pairs(tmp_path / "t", 20, split="test_2016_flickr")
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--src", str(src), "--ref", str(ref),
                 "--method", "greedy", "--quiet"]) == 0
    bleu = float(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("BLEU =")).split()[2])
    card = (export(tiny_checkpoint, "ct2", tmp_path / "ct2") / "README.md").read_text(encoding="utf-8")
    assert "de → en" in card and "| steps | 30" in card
    assert f"| greedy | {bleu:.2f} |" in card and "BLEU|nrefs:1|" in card and str(src) in card
    assert f"mt export --checkpoint {tiny_checkpoint} --format ct2 --output {tmp_path / 'ct2'}" in card


def test_an_output_under_a_regular_file_is_one_line(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--format", "ct2", "--output",
                 str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{tmp_path / 'file'} is not a directory" in err
