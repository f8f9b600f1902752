"""Config: defaults, YAML + --set overrides, strict validation with one-line messages, the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mt.config import Config, load_config, save_config
from mt.errors import MTError

from conftest import ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_file_values_and_overrides_are_applied_with_yaml_types(tmp_path):
    path = write(tmp_path, "model:\n  d_model: 256\n  n_heads: 4\ntrain:\n  peak_lr: 1.0e-3\n")
    cfg = load_config(path, ["train.adam_betas=[0.9, 0.99]", "model.n_decoder_layers=2", "train.peak_lr=5e-4",
                             "model.n_decoder_layers=null", "decode.beam_size=5"])
    assert cfg.model.d_model == 256 and cfg.model.n_heads == 4
    assert cfg.train.adam_betas == (0.9, 0.99)
    assert cfg.train.peak_lr == 5e-4  # the later --set wins; '5e-4' (YAML 1.1: a string) is read as a float
    assert cfg.model.n_decoder_layers is None and cfg.model.decoder_layers == cfg.model.n_layers
    assert cfg.decode.beam_size == 5
    assert cfg.data.vocab_size == Config().data.vocab_size  # untouched keys keep their defaults


@pytest.mark.parametrize("text, overrides, message", [
    ("model:\n  d_modle: 512\n", [], "c.yaml: unknown key 'model.d_modle' (did you mean 'model.d_model'?)"),
    ("modle:\n  d_model: 512\n", [], "c.yaml: unknown key 'modle' (did you mean 'model'?)"),
    ("", ["train.max_step=10"], "unknown key 'train.max_step' (did you mean 'train.max_steps'?)"),
    ("model:\n  d_model: big\n", [], "c.yaml: model.d_model must be int, got str 'big'"),
    ("model:\n  d_model: true\n", [], "c.yaml: model.d_model must be int, got bool True"),
    ("train:\n  adam_betas: [0.9]\n", [], "c.yaml: train.adam_betas must be a list of 2 values"),
    ("model:\n  d_model: 500\n", [], "c.yaml: model.d_model (500) must be divisible by model.n_heads (8)"),
    ("model:\n  dropout: -0.1\n", [], "c.yaml: model.dropout must be in [0, 1), got -0.1"),
    ("train:\n  label_smoothing: 1.0\n", [], "c.yaml: train.label_smoothing must be in [0, 1), got 1.0"),
    ("train:\n  precision: bf61\n", [], "c.yaml: train.precision must be one of fp32, bf16, fp16, got 'bf61' "
                                        "(did you mean 'bf16'?)"),
    ("data:\n  min_len: 10\n  max_len: 5\n", [], "c.yaml: data.min_len (10) is larger than data.max_len (5)"),
    ("decode:\n  nbest: 5\n  beam_size: 4\n", [], "c.yaml: decode.nbest (5) cannot exceed decode.beam_size (4)"),
    ("train:\n  warmup_steps: 0\n", [], "c.yaml: train.warmup_steps must be positive, got 0"),
    ("data:\n  src_lang: en\n  tgt_lang: en\n", [], "c.yaml: data.src_lang and data.tgt_lang must differ"),
    ("- a\n- b\n", [], "c.yaml: the top level must be a mapping of sections, got list"),
    ("model: [1, 2\n", [], "c.yaml: line 2 invalid YAML"),
    ("", ["model.d_model"], "--set model.d_model: expected section.key=value"),
])
def test_bad_configs_stop_with_one_line_naming_file_and_key(tmp_path, text, overrides, message):
    with pytest.raises(MTError) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(MTError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(ROOT / "configs" / "multi30k.yaml", ["train.adam_betas=[0.8, 0.9]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_base_and_big_hold_the_papers_recipe():
    base = load_config(ROOT / "configs" / "base.yaml")
    big = load_config(ROOT / "configs" / "big.yaml")
    for cfg, d, heads, ff, drop, steps, avg in ((base, 512, 8, 2048, 0.1, 100_000, 5),
                                                (big, 1024, 16, 4096, 0.3, 300_000, 20)):
        m, t, s, data = cfg.model, cfg.train, cfg.decode, cfg.data
        assert (m.d_model, m.n_heads, m.d_ff, m.dropout) == (d, heads, ff, drop)
        assert m.n_layers == m.decoder_layers == 6 and m.norm == "post" and m.tie_embeddings
        assert (t.label_smoothing, t.adam_betas, t.adam_eps, t.warmup_steps) == (0.1, (0.9, 0.98), 1e-9, 4000)
        assert t.lr_scale == 1.0 and t.peak_lr is None  # lr = d_model^-0.5 * min(step^-0.5, step * 4000^-1.5)
        assert (t.max_steps, t.average_last) == (steps, avg)
        assert data.joint_vocab and data.vocab_size == 37000 and data.spm_model_type == "bpe"
        assert data.max_tokens * t.update_freq == 25000  # ~25,000 source + 25,000 target tokens per batch
        assert (data.src_lang, data.tgt_lang) == ("en", "de")
        assert (s.beam_size, s.length_penalty, s.max_len_a, s.max_len_b) == (4, 0.6, 1.0, 50)


def test_shipped_small_configs_load():
    for name in ("multi30k", "tiny"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.data.train and cfg.model.d_model % cfg.model.n_heads == 0
