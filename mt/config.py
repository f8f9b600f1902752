"""Experiment configuration: one dataclass per YAML section, loading, validation and `--set` overrides.

A config file has up to five top-level keys: `run_dir` and the sections `data`, `model`, `train`, `decode`.
Every key has a default, so a file only names what it changes. Validation is strict: an unknown key, a value
of the wrong type or an impossible value stops with one line naming the file and the key (and, for a typo,
the closest valid key), before any work is done.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mt.errors import MTError
from mt.io import atomic_write_text


@dataclass
class DataConfig:
    """Corpora, filtering, SentencePiece and batching."""

    src_lang: str = "de"
    tgt_lang: str = "en"
    # A corpus is named by one string (see mt.data.read_corpus):
    #   PREFIX              -> PREFIX.{src_lang}, PREFIX.{tgt_lang} (each plain or .gz)
    #   FILE.tsv[.gz]       -> one tab-separated pair per line
    #   hf:NAME[:CONFIG[:SPLIT]] -> Hugging Face `datasets` (hub name, local data file or saved dataset)
    train: str = ""
    valid: str = ""
    test: str = ""
    # Filters, in SentencePiece tokens (before BOS/EOS are added).
    min_len: int = 1
    max_len: int = 250
    max_len_ratio: float = 9.0
    # SentencePiece (Kudo & Richardson, 2018): the paper's shared source-target vocabulary is `joint_vocab`.
    joint_vocab: bool = True
    vocab_size: int = 8000
    spm_model_type: str = "unigram"
    character_coverage: float = 1.0
    spm_max_sentences: int = 2_000_000  # sentences sampled to learn the vocabulary from a large corpus
    # Token batching (Section 5.1: "batched together by approximate sequence length").
    max_tokens: int = 4096  # padded tokens per side per batch (per process)
    encode_threads: int = 0  # 0: all cores


@dataclass
class ModelConfig:
    """The Transformer's shape (Section 3, Table 3). Vocabulary sizes come from the SentencePiece model."""

    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6  # encoder layers (decoder-only: the one stack's; n_decoder_layers is then unused)
    n_decoder_layers: Optional[int] = None  # None: same as n_layers
    d_ff: int = 2048
    dropout: float = 0.1  # P_drop: on sub-layer outputs and on embedding + position sums (Section 5.4)
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    norm: str = "post"  # "post": LayerNorm(x + Sublayer(x)) as in the paper; "pre": x + Sublayer(LayerNorm(x));
    # "rms_pre": pre-norm with RMSNorm (Zhang & Sennrich, 2019)
    ffn: str = "relu"  # relu (Section 3.3) | gelu | swiglu (Shazeer, 2020: three projections, no biases)
    # SwiGLU's hidden width; None: 2/3 d_ff rounded to a multiple of 8, so that its three matrices hold about the
    # parameters of the ReLU layer's two (see ModelConfig.ffn_width)
    swiglu_d_ff: Optional[int] = None
    positions: str = "sinusoidal"  # sinusoidal (Section 3.5) | learned | rope (rotary, Su et al., 2021)
    # encoder_decoder (Section 3) | decoder_only: one stack of n_layers reading `source EOS BOS target`, the source
    # attending both ways (a prefix LM), the target causally; needs data.joint_vocab
    arch: str = "encoder_decoder"
    tie_embeddings: bool = True  # Section 3.4: target embedding = pre-softmax projection
    embed_init: str = "xavier"  # xavier: Xavier-uniform, as every matrix | normal: N(0, d_model^-0.5), as fairseq
    # sinusoidal: the table's first size (extended on demand); learned: the most positions a sentence (decoder-only:
    # source and target together) may have; rope: the rotation table's first size
    max_positions: int = 1024
    activation_checkpointing: bool = False

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @property
    def ffn_width(self) -> int:
        """The feed-forward network's hidden width: d_ff, or for SwiGLU swiglu_d_ff, by default 2/3 d_ff rounded
        to a multiple of 8 (three d_model x width matrices against ReLU's two d_model x d_ff)."""
        if self.ffn != "swiglu":
            return self.d_ff
        if self.swiglu_d_ff is not None:
            return self.swiglu_d_ff
        return max(8, 8 * round(2 * self.d_ff / 3 / 8))


@dataclass
class TrainConfig:
    """Optimisation (Section 5.3), regularisation (Section 5.4) and the loop's bookkeeping."""

    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 only on CUDA) | auto (bf16 where native, else fp32)
    update_freq: int = 1  # gradient accumulation: batches per optimiser step
    max_steps: int = 100_000
    max_epochs: int = 0  # 0: no limit
    # A wall-time budget (0: none), turned into a fixed step budget after budget_calibration_steps steps from
    # their speed and a validation's; with lr_schedule linear, warmup_steps >= budget_calibration_steps keeps the
    # learning rate of those first steps independent of the budget.
    max_time_minutes: float = 0.0
    budget_calibration_steps: int = 200
    patience: int = 0  # validations without improvement before stopping; 0: never stop early
    label_smoothing: float = 0.1
    # The smoothing mass epsilon goes to all V types (as F.cross_entropy), or with smoothing_excludes_pad to the
    # V - 2 types other than the reference and padding (JoeyNMT, OpenNMT).
    smoothing_excludes_pad: bool = False
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    # lr = lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)   (Equation 3)
    # or, with peak_lr set, the same curve rescaled so that it peaks at peak_lr at step = warmup_steps.
    warmup_steps: int = 4000
    lr_scale: float = 1.0
    peak_lr: Optional[float] = None
    # inverse_sqrt: Equation 3 | linear: warmup, then straight to zero at the end of max_steps or
    # max_time_minutes, whichever comes first (the better choice under a wall-time budget)
    lr_schedule: str = "inverse_sqrt"
    clip_norm: float = 0.0  # 0: no clipping
    validate_every: int = 1000
    valid_bleu: bool = True  # greedy-decode the dev set at each validation
    best_metric: str = "bleu"  # bleu | loss
    log_every: int = 100
    save_every: int = 1000
    keep_checkpoints: int = 5
    average_last: int = 5  # Section 6.1: average the last N checkpoints at the end; 0: do not
    # Stop after this many updates in a row skipped for a non-finite loss or gradient (checked at log lines).
    nonfinite_limit: int = 10
    compile: bool = False
    num_threads: int = 0  # torch intra-op threads on CPU; 0: torch's default
    log_to: list[str] = field(default_factory=list)  # also mirror metrics.jsonl to: tensorboard (RUN_DIR/tensorboard)


@dataclass
class DecodeConfig:
    """Search (Section 6.1: beam 4, length penalty 0.6, max output length input + 50)."""

    method: str = "beam"  # beam | greedy | sample
    precision: str = "fp32"  # fp32 | bf16 | int8 (CPU) | auto (bf16 where native): the weights search runs with
    beam_size: int = 4
    length_penalty: float = 0.6
    # Beam search stops a sentence when no live hypothesis can still win (exact); early_stop: also as soon as the
    # step's best candidate is EOS (OpenNMT's and CTranslate2's rule: faster, not exact).
    early_stop: bool = False
    nbest: int = 1
    max_len_a: float = 1.0  # max output length = max_len_a * input length + max_len_b
    max_len_b: int = 50
    max_tokens: int = 0  # source tokens per translation batch; 0: by device (mt.runtime.decode_batch_tokens)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


CHOICES = {
    ("data", "spm_model_type"): ("unigram", "bpe", "char", "word"),
    ("model", "norm"): ("post", "pre", "rms_pre"),
    ("model", "ffn"): ("relu", "gelu", "swiglu"),
    ("model", "positions"): ("sinusoidal", "learned", "rope"),
    ("model", "arch"): ("encoder_decoder", "decoder_only"),
    ("model", "embed_init"): ("xavier", "normal"),
    ("train", "precision"): ("fp32", "bf16", "fp16", "auto"),
    ("train", "best_metric"): ("bleu", "loss"),
    ("train", "lr_schedule"): ("inverse_sqrt", "linear"),
    ("decode", "method"): ("beam", "greedy", "sample"),
    ("decode", "precision"): ("fp32", "bf16", "int8", "auto"),
}

LOG_SINKS = ("tensorboard",)  # train.log_to: where metrics.jsonl's records are also written


# --------------------------------------------------------------------------------------------------------
# Loading


class _Loader(yaml.SafeLoader):
    """YAML with the booleans of YAML 1.2, true and false only. PyYAML follows YAML 1.1, which also reads
    yes/no/on/off as booleans and so turns `src_lang: no` (Norwegian) into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from the defaults), apply `section.key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MTError(f"{path}: config file not found") from None
        except UnicodeDecodeError as e:
            raise MTError(f"{path}: not valid UTF-8 (byte {e.start})") from None
        try:
            raw = _parse_yaml(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise MTError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise MTError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(Config, raw, where)
    validate(cfg, where)
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Apply one `--set section.key=value` to a raw config dict; the value is parsed as YAML (`1e-3`, `[0.9, 0.98]`)."""
    if "=" not in item:
        raise MTError(f"--set {item}: expected section.key=value")
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    # Checked here, so that a mistyped --set is reported as such and not under the config file's name.
    cls: Any = Config
    for depth, key in enumerate(keys):
        names = [f.name for f in dataclasses.fields(cls)]
        if key not in names:
            section = "".join(part + "." for part in keys[:depth])
            raise MTError(f"--set {item}: {_unknown_key(key, names, section)}")
        cls = typing.get_type_hints(cls)[key]
        if depth < len(keys) - 1 and not dataclasses.is_dataclass(cls):
            raise MTError(f"--set {item}: {key} is not a section")
    node = raw
    for key in keys[:-1]:
        if node.get(key) is None:  # absent, or an empty section
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise MTError(f"--set {item}: {key} is not a section")
    try:
        node[keys[-1]] = _parse_yaml(value)
    except yaml.YAMLError:
        raise MTError(f"--set {item}: cannot parse value {value!r}") from None


def from_dict(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, checking every key and value type."""
    if not isinstance(raw, dict):
        raise MTError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise MTError(f"{where}: {_unknown_key(str(key), names, prefix)}")
        kwargs[key] = _convert(hints[key], value, where, f"{prefix}{key}")
    return cls(**kwargs)


def _unknown_key(key: str, names: list[str], prefix: str) -> str:
    """The message for `key`, not among `names` (the fields of the section `prefix`), with the closest one."""
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
    return f"unknown key '{prefix}{key}'{hint}"


# Corpora a run can do without, where null (an empty `valid:`) means the same as the empty string.
OPTIONAL_PATHS = ("data.valid", "data.test")


def _convert(tp: Any, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        # An empty section (`model:` with every key commented out) reads as null: keep the defaults.
        return from_dict(tp, {} if value is None else value, where, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where, key)
    if origin is list:
        if not isinstance(value, list):
            raise MTError(f"{where}: {key} must be a list, e.g. [{value}], got {_show(value)}")
        return [_convert(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise MTError(f"{where}: {key} must be a list of {len(args)} values, got {_show(value)}")
        return tuple(_convert(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is None and key in OPTIONAL_PATHS:  # `valid:` left empty, or --set data.valid=null: none
            return ""
    else:  # pragma: no cover - a field type this function does not know is a programming error
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise MTError(f"{where}: {key} must be {tp.__name__}, got {_show(value)}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


# --------------------------------------------------------------------------------------------------------
# Validation: values that parse but cannot work.


def validate(cfg: Config, where: str = "<config>") -> None:
    def bad(key: str, why: str) -> MTError:
        return MTError(f"{where}: {key} {why}")

    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise bad(f"{section}.{key}", f"must be one of {', '.join(allowed)}, got '{value}'{hint}")

    data, model, train, decode = cfg.data, cfg.model, cfg.train, cfg.decode
    if data.src_lang == data.tgt_lang:
        raise bad("data.src_lang", f"and data.tgt_lang must differ, both are '{data.src_lang}'")
    positive = {
        "data.vocab_size": data.vocab_size, "data.max_len": data.max_len, "data.max_tokens": data.max_tokens,
        "data.spm_max_sentences": data.spm_max_sentences,
        "model.d_model": model.d_model, "model.n_heads": model.n_heads, "model.n_layers": model.n_layers,
        "model.d_ff": model.d_ff, "model.max_positions": model.max_positions,
        "train.update_freq": train.update_freq, "train.max_steps": train.max_steps,
        "train.warmup_steps": train.warmup_steps, "train.validate_every": train.validate_every,
        "train.log_every": train.log_every, "train.save_every": train.save_every,
        "train.keep_checkpoints": train.keep_checkpoints, "train.lr_scale": train.lr_scale,
        "train.adam_eps": train.adam_eps, "train.budget_calibration_steps": train.budget_calibration_steps,
        "train.nonfinite_limit": train.nonfinite_limit,
        "decode.beam_size": decode.beam_size, "decode.nbest": decode.nbest, "decode.temperature": decode.temperature,
    }
    for key, value in positive.items():
        if value <= 0:
            raise bad(key, f"must be positive, got {value}")
    non_negative = {
        "data.min_len": data.min_len, "data.encode_threads": data.encode_threads,
        "train.max_epochs": train.max_epochs, "train.max_time_minutes": train.max_time_minutes,
        "train.patience": train.patience, "train.weight_decay": train.weight_decay,
        "train.clip_norm": train.clip_norm, "train.average_last": train.average_last,
        "train.num_threads": train.num_threads,
        "decode.max_len_b": decode.max_len_b, "decode.max_len_a": decode.max_len_a, "decode.top_k": decode.top_k,
        "decode.max_tokens": decode.max_tokens,
        "decode.length_penalty": decode.length_penalty,
    }
    if model.n_decoder_layers is not None:
        non_negative["model.n_decoder_layers"] = model.n_decoder_layers
    for key, value in non_negative.items():
        if value < 0:
            raise bad(key, f"must not be negative, got {value}")
    probabilities = {
        "model.dropout": model.dropout, "model.attention_dropout": model.attention_dropout,
        "model.activation_dropout": model.activation_dropout, "train.label_smoothing": train.label_smoothing,
    }
    for key, value in probabilities.items():
        if not 0.0 <= value < 1.0:
            raise bad(key, f"must be in [0, 1), got {value}")
    if data.min_len > data.max_len:
        raise bad("data.min_len", f"({data.min_len}) is larger than data.max_len ({data.max_len})")
    if data.max_len_ratio < 1.0:
        raise bad("data.max_len_ratio", f"must be at least 1, got {data.max_len_ratio}")
    if not 0.9 <= data.character_coverage <= 1.0:
        raise bad("data.character_coverage", f"must be in [0.9, 1], got {data.character_coverage}")
    if data.vocab_size < 8:
        raise bad("data.vocab_size", f"must be at least 8 (4 special tokens + pieces), got {data.vocab_size}")
    if data.max_tokens < data.max_len + 2:
        raise bad("data.max_tokens", f"({data.max_tokens}) must hold one sentence of data.max_len + 2 tokens")
    if model.d_model % model.n_heads:
        raise bad("model.d_model", f"({model.d_model}) must be divisible by model.n_heads ({model.n_heads})")
    if model.d_model % 2:
        raise bad("model.d_model", f"must be even for the sinusoidal encodings, got {model.d_model}")
    if model.positions == "rope" and (model.d_model // model.n_heads) % 2:
        raise bad("model.positions", f"rope rotates pairs of dimensions: the head width d_model / n_heads "
                  f"({model.d_model // model.n_heads}) must be even")
    if model.positions == "learned":  # a training pair must fit the table: the source + EOS, BOS + the target
        needed = (data.max_len + 1) * (2 if model.arch == "decoder_only" else 1)
        if model.max_positions < needed:
            raise bad("model.max_positions", f"({model.max_positions}) has no room for the longest training pair "
                      f"(data.max_len {data.max_len}): learned positions need {needed}")
    if model.swiglu_d_ff is not None and model.swiglu_d_ff <= 0:
        raise bad("model.swiglu_d_ff", f"must be positive, got {model.swiglu_d_ff}")
    if model.arch == "decoder_only" and not data.joint_vocab:
        raise bad("model.arch", "decoder_only reads source and target with one embedding: it needs "
                  "data.joint_vocab: true")
    for i, beta in enumerate(train.adam_betas):
        if not 0.0 <= beta < 1.0:
            raise bad(f"train.adam_betas[{i}]", f"must be in [0, 1), got {beta}")
    if train.peak_lr is not None and train.peak_lr <= 0:
        raise bad("train.peak_lr", f"must be positive, got {train.peak_lr}")
    if train.device != "auto" and train.device != "cpu" and not train.device.startswith("cuda"):
        raise bad("train.device", f"must be auto, cpu, cuda or cuda:N, got '{train.device}'")
    if not 0.0 < decode.top_p <= 1.0:
        raise bad("decode.top_p", f"must be in (0, 1], got {decode.top_p}")
    if decode.nbest > decode.beam_size and decode.method == "beam":
        raise bad("decode.nbest", f"({decode.nbest}) cannot exceed decode.beam_size ({decode.beam_size})")
    if train.average_last > train.keep_checkpoints:
        raise bad("train.average_last", f"({train.average_last}) cannot exceed train.keep_checkpoints "
                  f"({train.keep_checkpoints}): only that many checkpoints are kept to average")
    for i, sink in enumerate(train.log_to):
        if sink not in LOG_SINKS:
            raise bad(f"train.log_to[{i}]", f"must be one of {', '.join(LOG_SINKS)}, got '{sink}'")
    if not cfg.run_dir:
        raise bad("run_dir", "must not be empty")


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples as lists) for YAML and checkpoints."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
