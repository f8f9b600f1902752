"""Config: defaults, YAML + --set overrides, strict validation with one-line messages, the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mt.config import Config, load_config, save_config, to_dict
from mt.errors import MTError

from conftest import ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None, overrides: list[str] = ()) -> str:
    with pytest.raises(MTError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_no_file_gives_the_defaults_which_are_the_papers_base_model():
    cfg = load_config()
    assert cfg == Config()
    m, t, s = cfg.model, cfg.train, cfg.decode
    assert (m.d_model, m.n_heads, m.n_layers, m.decoder_layers, m.d_ff, m.dropout) == (512, 8, 6, 6, 2048, 0.1)
    assert (t.label_smoothing, t.adam_betas, t.adam_eps, t.warmup_steps) == (0.1, (0.9, 0.98), 1e-9, 4000)
    assert (s.beam_size, s.length_penalty, s.max_len_a, s.max_len_b) == (4, 0.6, 1.0, 50)
    assert load_config(None, ["model.d_model=256", "model.n_heads=4"]).model.d_model == 256


def test_an_empty_file_or_an_empty_section_keeps_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing changed\n")) == Config()
    # A section whose keys are all commented out is YAML null, not an error.
    assert load_config(write(tmp_path, "model:\n  # d_model: 1024\ntrain:\n")) == Config()
    assert load_config(write(tmp_path, "model:\n"), ["model.d_model=256", "model.n_heads=4"]).model.d_model == 256


def test_an_empty_or_null_path_means_none(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  train: a\n  valid:\n  test: b\n"), ["data.test=null"])
    assert (cfg.data.train, cfg.data.valid, cfg.data.test) == ("a", "", "")
    with pytest.raises(MTError, match="data.train must be str, got null"):  # a run cannot do without it
        load_config(None, ["data.train=null"])


def test_language_codes_that_yaml_1_1_reads_as_booleans_stay_strings(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  src_lang: no\n  tgt_lang: on\ntrain:\n  valid_bleu: false\n"))
    assert (cfg.data.src_lang, cfg.data.tgt_lang, cfg.train.valid_bleu) == ("no", "on", False)
    cfg = load_config(None, ["data.tgt_lang=no", "data.src_lang=en", "train.compile=true"])
    assert (cfg.data.tgt_lang, cfg.train.compile) == ("no", True)


def test_file_values_and_overrides_are_applied_with_yaml_types(tmp_path):
    path = write(tmp_path, "model:\n  d_model: 256\n  n_heads: 4\ntrain:\n  peak_lr: 1.0e-3\n")
    cfg = load_config(path, ["train.adam_betas=[0.9, 0.99]", "model.n_decoder_layers=2", "train.peak_lr=5e-4",
                             "model.n_decoder_layers=null", "decode.beam_size=5", "model.dropout=0.25",
                             "train.label_smoothing=0", "data.train=hf:wmt14:de-en:train", "run_dir=runs/a=b"])
    assert cfg.model.d_model == 256 and cfg.model.n_heads == 4
    assert cfg.train.adam_betas == (0.9, 0.99)
    assert cfg.train.peak_lr == 5e-4  # the later --set wins; '5e-4' (YAML 1.1: a string) is read as a float
    assert cfg.model.n_decoder_layers is None and cfg.model.decoder_layers == cfg.model.n_layers
    assert cfg.decode.beam_size == 5
    assert cfg.model.dropout == 0.25
    assert cfg.train.label_smoothing == 0.0 and type(cfg.train.label_smoothing) is float  # an int for a float
    assert cfg.data.train == "hf:wmt14:de-en:train"  # colons without spaces stay a string
    assert cfg.run_dir == "runs/a=b"  # only the first '=' separates key and value
    assert cfg.data.vocab_size == Config().data.vocab_size  # untouched keys keep their defaults


@pytest.mark.parametrize("text, overrides, message", [
    # unknown keys, with the closest valid key
    ("model:\n  d_modle: 512\n", [], "c.yaml: unknown key 'model.d_modle' (did you mean 'model.d_model'?)"),
    ("modle:\n  d_model: 512\n", [], "c.yaml: unknown key 'modle' (did you mean 'model'?)"),
    ("", ["train.max_step=10"], "--set train.max_step=10: unknown key 'train.max_step' (did you mean 'train.max_steps'?)"),
    # wrong types
    ("model:\n  d_model: big\n", [], "c.yaml: model.d_model must be int, got str 'big'"),
    ("model:\n  d_model: true\n", [], "c.yaml: model.d_model must be int, got bool True"),
    ("model:\n  n_layers: 6.5\n", [], "c.yaml: model.n_layers must be int, got float 6.5"),
    ("model:\n  dropout: high\n", [], "c.yaml: model.dropout must be float, got str 'high'"),
    ("model:\n  tie_embeddings: 1\n", [], "c.yaml: model.tie_embeddings must be bool, got int 1"),
    ("train:\n  adam_betas: [0.9]\n", [], "c.yaml: train.adam_betas must be a list of 2 values, got list [0.9]"),
    ("model: 3\n", [], "c.yaml: model must be a mapping, got int 3"),
    # impossible values
    ("model:\n  d_model: 500\n", [], "c.yaml: model.d_model (500) must be divisible by model.n_heads (8)"),
    ("model:\n  n_heads: 0\n", [], "c.yaml: model.n_heads must be positive, got 0"),
    ("model:\n  dropout: -0.1\n", [], "c.yaml: model.dropout must be in [0, 1), got -0.1"),
    ("model:\n  dropout: 1.0\n", [], "c.yaml: model.dropout must be in [0, 1), got 1.0"),
    ("train:\n  label_smoothing: 1.0\n", [], "c.yaml: train.label_smoothing must be in [0, 1), got 1.0"),
    ("train:\n  precision: bf61\n", [], "c.yaml: train.precision must be one of fp32, bf16, fp16, auto, got 'bf61' "
                                        "(did you mean 'bf16'?)"),
    ("data:\n  min_len: 10\n  max_len: 5\n", [], "c.yaml: data.min_len (10) is larger than data.max_len (5)"),
    ("decode:\n  nbest: 5\n  beam_size: 4\n", [], "c.yaml: decode.nbest (5) cannot exceed decode.beam_size (4)"),
    ("train:\n  warmup_steps: 0\n", [], "c.yaml: train.warmup_steps must be positive, got 0"),
    ("data:\n  src_lang: en\n  tgt_lang: en\n", [], "c.yaml: data.src_lang and data.tgt_lang must differ, "
                                                    "both are 'en'"),
    ("data:\n  max_len: 250\n  max_tokens: 200\n", [],
     "c.yaml: data.max_tokens (200) must hold one sentence of data.max_len + 2 tokens"),
    ("train:\n  adam_betas: [0.9, 1.5]\n", [], "c.yaml: train.adam_betas[1] must be in [0, 1), got 1.5"),
    # the file itself
    ("- a\n- b\n", [], "c.yaml: the top level must be a mapping of sections, got list"),
    ("model:\n  d_model: 512\n\tn_heads: 8\n", [], "c.yaml: line 3 invalid YAML: found character '\\t' that "
                                                   "cannot start any token"),
    ("", ["model.d_model"], "--set model.d_model: expected section.key=value"),
    ("run_dir: x\n", ["run_dir.x=1"], "--set run_dir.x=1: run_dir is not a section"),
    ("", ["trian.peak_lr=1e-3"], "--set trian.peak_lr=1e-3: unknown key 'trian' (did you mean 'train'?)"),
])
def test_bad_configs_stop_with_one_line_naming_file_and_key(tmp_path, text, overrides, message):
    got = error_of(write(tmp_path, text), overrides)
    assert got == message or got == f"{tmp_path}/{message}", got


def test_a_bad_choice_without_a_close_match_lists_the_choices_only(tmp_path):
    assert error_of(write(tmp_path, "decode:\n  method: xyz\n")) == (
        f"{tmp_path}/c.yaml: decode.method must be one of beam, greedy, sample, got 'xyz'")


def test_nbest_above_beam_size_is_fine_for_other_search_methods(tmp_path):
    assert load_config(None, ["decode.method=sample", "decode.nbest=8"]).decode.nbest == 8
    assert error_of(None, ["decode.nbest=8"]) == "<defaults>: decode.nbest (8) cannot exceed decode.beam_size (4)"


def test_missing_config_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path}/nope.yaml: config file not found"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    for name, overrides in (("multi30k", ["train.adam_betas=[0.8, 0.9]"]),
                            ("base", ["model.n_decoder_layers=2", "train.peak_lr=null"])):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", overrides)
        save_config(cfg, tmp_path / "resolved.yaml")
        assert load_config(tmp_path / "resolved.yaml") == cfg
        # Every key is written, defaults included, so the file alone describes the run.
        written = yaml.safe_load((tmp_path / "resolved.yaml").read_text(encoding="utf-8"))
        assert written == to_dict(cfg) and set(written["train"]) == set(to_dict(Config())["train"])
    assert [p.name for p in tmp_path.iterdir()] == ["resolved.yaml"]  # no temporary file left beside it


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
        assert (s.method, s.beam_size, s.length_penalty, s.max_len_a, s.max_len_b) == ("beam", 4, 0.6, 1.0, 50)


def test_shipped_small_configs_load_and_point_at_multi30k():
    for name in ("multi30k", "tiny"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert (cfg.data.src_lang, cfg.data.tgt_lang) == ("de", "en")
        # Paths are relative to the repository root, where the README runs mt from.
        assert (ROOT / f"{cfg.data.train}.de").is_file() and (ROOT / f"{cfg.data.valid}.en").is_file()
