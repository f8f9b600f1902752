"""mt plot and mt attention: the pictures are read back (the figure's lines and panels, the SVG's paths) and
compared with metrics.jsonl and with attention computed independently from the model's weights."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from mt.checkpoint import load_for_inference
from mt.cli import main
from mt.data import EOS
from mt.model import DecoderLayer, EncoderLayer, padding_mask
from mt.plot import PANELS, attention_figure, attention_inputs, learning_curves
from mt.translate import load_translator, translate_lines

# A resumed run: the process killed after step 30 had logged 20 and 30 again after its checkpoint at 10.
RESUMED = [
    {"step": 0, "hardware": {"device": "cpu", "name": "test"}, "flops_per_token": 1e6, "peak_flops": 1e11},
    {"step": 10, "loss": 7.0, "ppl": 900.0, "lr": 1e-4, "tokens_per_s": 1000.0, "elapsed_s": 60.0},
    {"step": 20, "loss": 6.0, "ppl": 300.0, "lr": 2e-4, "tokens_per_s": 1100.0, "elapsed_s": 120.0},
    {"step": 20, "valid_loss": 6.5, "valid_ppl": 500.0, "valid_bleu": 1.5},
    {"step": 30, "loss": 5.0, "ppl": 100.0, "lr": 3e-4, "tokens_per_s": 1200.0, "elapsed_s": 180.0},
    {"step": 10, "hardware": {"device": "cpu", "name": "test"}, "flops_per_token": 1e6, "peak_flops": 1e11},
    {"step": 20, "loss": 6.1, "ppl": 310.0, "lr": 2e-4, "tokens_per_s": 900.0, "elapsed_s": 130.0},
    {"step": 20, "valid_loss": 6.4, "valid_ppl": 480.0, "valid_bleu": 1.7},
    {"step": 30, "loss": 5.1, "ppl": 110.0, "lr": 3e-4, "tokens_per_s": 950.0, "elapsed_s": 200.0},
    {"step": 40, "loss": 4.0, "ppl": 50.0, "lr": 4e-4, "tokens_per_s": 1000.0, "elapsed_s": 270.0},
    {"step": 40, "valid_loss": 4.5, "valid_ppl": 90.0, "valid_bleu": 6.0, "elapsed_s": 280.0},
]
# What each metric of RESUMED should plot: the resumed process's records replace the killed one's.
EXPECTED = {
    "loss": ([10, 20, 30, 40], [7.0, 6.1, 5.1, 4.0]), "ppl": ([10, 20, 30, 40], [900.0, 310.0, 110.0, 50.0]),
    "lr": ([10, 20, 30, 40], [1e-4, 2e-4, 3e-4, 4e-4]),
    "tokens_per_s": ([10, 20, 30, 40], [1000.0, 900.0, 950.0, 1000.0]),
    "valid_loss": ([20, 40], [6.4, 4.5]), "valid_ppl": ([20, 40], [480.0, 90.0]), "valid_bleu": ([20, 40], [1.7, 6.0]),
}
KEYS = [key for _, lines in PANELS for key, _ in lines]


def _write_run(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 50, "lo',
                                        encoding="utf-8")  # and a line cut short by a kill
    return path


def _logged(run_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Each metric of a run that was never resumed, straight from its metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {key: ([r["step"] for r in records if key in r], [r[key] for r in records if key in r]) for key in KEYS}


def test_learning_curves_draw_one_line_per_run_and_metric_with_the_logged_values(tiny_checkpoint, tmp_path):
    tiny, resumed = tiny_checkpoint.parent, _write_run(tmp_path / "resumed", RESUMED)
    figure = learning_curves([tiny, resumed])
    expected = {"run": _logged(tiny), "resumed": EXPECTED}
    assert all(expected["run"][key][0] for key in KEYS)  # the tiny run logged every metric
    lines = {line.get_gid(): line for ax in figure.axes for line in ax.lines}
    assert len(lines) == sum(len(ax.lines) for ax in figure.axes) == 2 * len(KEYS) * 2  # runs x metrics x axes
    for name, metrics in expected.items():
        for key, (steps, values) in metrics.items():
            line = lines[f"{name}:{key}:step"]
            assert list(line.get_xdata()) == steps and list(line.get_ydata()) == pytest.approx(values)
            assert line.get_label() == f"{name} {'dev' if key.startswith('valid_') else 'train'}"
            assert list(lines[f"{name}:{key}:hours"].get_ydata()) == pytest.approx(values)
    # Hours: each record's elapsed_s; a validation without it takes the training clock at its step.
    assert list(lines["resumed:loss:hours"].get_xdata()) == pytest.approx([60 / 3600, 130 / 3600, 200 / 3600, 0.075])
    assert list(lines["resumed:valid_loss:hours"].get_xdata()) == pytest.approx([130 / 3600, 280 / 3600])
    # Every panel's legend names the runs it shows.
    for ax in figure.axes:
        assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == sorted(l.get_label() for l in ax.lines)


def test_svg_output_has_one_path_per_run_and_metric_with_a_vertex_per_record(tiny_checkpoint, tmp_path):
    resumed = _write_run(tmp_path / "resumed", RESUMED)
    assert main(["plot", str(tiny_checkpoint.parent), str(resumed), "--output", str(tmp_path / "curves.svg"),
                 "--quiet"]) == 0
    svg = ET.parse(tmp_path / "curves.svg").getroot()
    groups = {g.get("id"): g for g in svg.iter("{http://www.w3.org/2000/svg}g") if ":" in (g.get("id") or "")}
    assert len(groups) == 2 * len(KEYS) * 2
    for key, (steps, _) in EXPECTED.items():
        for axis in ("step", "hours"):
            # matplotlib writes a line as one path "M x y L x y ..."; markers (dev) are separate <use> elements.
            (path, *_) = groups[f"resumed:{key}:{axis}"].iter("{http://www.w3.org/2000/svg}path")
            assert len(re.findall(r"[ML]\s", path.get("d"))) == len(steps), (key, path.get("d"))
    assert main(["plot", str(resumed), "--output", str(tmp_path / "curves.png"), "--quiet"]) == 0
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "curves.png").shape[2] == 4  # a PNG matplotlib reads back


def _plain_attention(q, k, n_heads, mask=None, causal=False):
    """softmax(Q K^T / sqrt(d_k)) per head from already projected q (B, Lq, D) and k (B, Lk, D)."""
    def heads(x):
        return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)
    q, k = heads(q), heads(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1)


def _reference_attention(model, src, tgt_in):
    """Every layer's attention for (src, tgt_in), from each layer's input (captured by hooks on a plain
    forward pass) and its projection weights alone: {(kind, layer): (B, H, Lq, Lk)}."""
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
             for name, m in model.named_modules() if isinstance(m, (EncoderLayer, DecoderLayer))]
    with torch.no_grad():
        memory, src_pad = model.encode(src)
        model.decode(tgt_in, memory, src_pad)
    for h in hooks:
        h.remove()
    pre, n_heads, mask = model.cfg.norm == "pre", model.cfg.n_heads, padding_mask(src_pad)
    out = {}
    with torch.no_grad():
        for i, layer in enumerate(model.encoder):
            x = inputs[f"encoder.{i}"]
            y = layer.res_attn.norm(x) if pre else x
            q, k, _ = torch.nn.functional.linear(y, layer.self_attn.qkv_proj.weight,
                                                 layer.self_attn.qkv_proj.bias).chunk(3, -1)
            out["encoder", i] = _plain_attention(q, k, n_heads, mask)
        for i, layer in enumerate(model.decoder):
            x = inputs[f"decoder.{i}"]
            y = layer.res_self.norm(x) if pre else x
            q, k, _ = torch.nn.functional.linear(y, layer.self_attn.qkv_proj.weight,
                                                 layer.self_attn.qkv_proj.bias).chunk(3, -1)
            out["decoder", i] = _plain_attention(q, k, n_heads, causal=True)
            y = layer.res_self(x, lambda z: layer.self_attn(z, causal=True))
            y = layer.res_cross.norm(y) if pre else y
            k, _ = layer.cross_attn.kv_proj(memory).chunk(2, -1)
            out["cross", i] = _plain_attention(layer.cross_attn.q_proj(y), k, n_heads, mask)
    return out


def test_attention_grid_draws_every_layer_and_head_as_the_plain_softmax_of_that_layer(tiny_checkpoint):
    model, vocab, cfg = load_for_inference(tiny_checkpoint)
    src, tgt_in = attention_inputs(model, vocab, "Ein Hund rennt über die Wiese.", "A dog runs across the meadow.",
                                   cfg.decode)
    assert src[0, -1] == EOS and tgt_in.size(1) == len(vocab.tgt.encode("A dog runs across the meadow.")) + 1
    figure, picture = attention_figure(model, vocab, src, tgt_in)
    layers, heads = model.cfg.n_layers, model.cfg.n_heads
    assert len(figure.axes) == len(picture.panels) == (layers + 2 * model.cfg.decoder_layers) * heads
    reference = _reference_attention(model, src, tgt_in)
    for (kind, layer, head), ax in picture.panels.items():
        (image,) = ax.get_images()
        drawn = torch.from_numpy(image.get_array().data.astype("float32"))
        expected = reference[kind, layer][0, head]
        torch.testing.assert_close(drawn, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(drawn.sum(-1), torch.ones(drawn.size(0)), atol=1e-5, rtol=0)
        queries = picture.target_out if kind == "cross" else picture.source if kind == "encoder" else picture.target_in
        keys = picture.source if kind in ("encoder", "cross") else picture.target_in
        assert [t.get_text() for t in ax.get_yticklabels()] == queries
        assert [t.get_text() for t in ax.get_xticklabels()] == keys
        assert ax.get_gid() == f"{kind}:{layer}:{head}"
    assert picture.source == [vocab.src.id_to_piece(i) for i in src[0].tolist()]  # SentencePiece pieces
    assert picture.target_out[-1] == vocab.tgt.id_to_piece(EOS)


def test_attention_without_a_target_draws_the_models_own_translation(tiny_checkpoint, tmp_path):
    translator = load_translator(tiny_checkpoint, device="cpu")
    sentence = "Zwei Männer stehen am Strand."
    src, tgt_in = attention_inputs(translator.model, translator.vocab, sentence, None, translator.decode)
    assert translator.vocab.tgt.decode(tgt_in[0, 1:].tolist()) == translate_lines(translator, [sentence])[0]
    assert main(["attention", "--checkpoint", str(tiny_checkpoint), "--src", sentence, "--output",
                 str(tmp_path / "att.png"), "--device", "cpu", "--quiet"]) == 0
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "att.png").ndim == 3


def test_a_missing_extra_an_empty_metrics_file_and_a_bad_suffix_are_one_line_errors(tiny_checkpoint, tmp_path,
                                                                                     monkeypatch, capsys):
    def error(*args: str) -> str:
        assert main(list(args)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mt: error: ") and "\n" not in err, err
        return err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("", encoding="utf-8")
    assert "empty or unreadable" in error("plot", str(empty), "--output", str(tmp_path / "c.png"))
    assert "not found" in error("plot", str(tmp_path), "--output", str(tmp_path / "c.png"))
    assert "must end in" in error("plot", str(tiny_checkpoint.parent), "--output", str(tmp_path / "c.gif"))
    no_checkpoints = tmp_path / "fresh"
    no_checkpoints.mkdir()
    shutil.copy(tiny_checkpoint.parent / "metrics.jsonl", no_checkpoints)
    assert "no checkpoints" in error("report", str(no_checkpoints))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [plot] extra were not installed
    for args in (["plot", str(tiny_checkpoint.parent), "--output", str(tmp_path / "c.png")],
                 ["attention", "--checkpoint", str(tiny_checkpoint), "--src", "Ein Hund.", "--output",
                  str(tmp_path / "a.png")],
                 ["report", str(tiny_checkpoint.parent)]):
        assert 'pip install -e ".[plot]"' in error(*args)
    assert not list(tmp_path.glob("*.png"))
