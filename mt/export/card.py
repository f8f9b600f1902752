"""The model card (README.md) of an export directory: what the model is, what it was trained on, how well it
did, the command that made it, and how to run it in its new home.

Scores come from the run directory the checkpoint sits in: the last validation in `metrics.jsonl`, and the
test sets `mt eval --checkpoint` scored this checkpoint on (`scores.jsonl`, with sacreBLEU's signatures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mt.config import Config
from mt.metrics import read_records
from mt.model import Transformer

USAGE = {
    "ct2": """```python
import ctranslate2, sentencepiece as spm
sp_src, sp_tgt = spm.SentencePieceProcessor("{dir}/source.spm"), spm.SentencePieceProcessor("{dir}/target.spm")
translator = ctranslate2.Translator("{dir}")
pieces = sp_src.encode(["{example}"], out_type=str)
result = translator.translate_batch(pieces, beam_size=4)
print(sp_tgt.decode(result[0].hypotheses[0]))
```""",
    "hf": """```python
from transformers import MarianMTModel, MarianTokenizer
tokenizer, model = MarianTokenizer.from_pretrained("{dir}"), MarianMTModel.from_pretrained("{dir}")
batch = tokenizer(["{example}"], return_tensors="pt", padding=True)
print(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True))
```""",
    "onnx": """```python
import numpy as np, onnxruntime as ort, sentencepiece as spm
sp_src, sp_tgt = spm.SentencePieceProcessor("{dir}/source.spm"), spm.SentencePieceProcessor("{dir}/target.spm")
encoder, decoder = ort.InferenceSession("{dir}/encoder.onnx"), ort.InferenceSession("{dir}/decoder_step.onnx")
PAD, BOS, EOS = 0, 2, 3
src = np.array([sp_src.encode("{example}") + [EOS]], dtype=np.int64)  # (batch, source length)
cross_keys, cross_values, mask = encoder.run(None, {{"src": src}})
L, B, H, _, Dh = cross_keys.shape
keys = values = np.zeros((L, B, H, 0, Dh), np.float32)  # the self-attention cache, empty at first
token, out = np.array([BOS]), []
for _ in range(src.shape[1] + 49):  # mt's limit: source length + 50 tokens, EOS included
    log_probs, keys, values = decoder.run(None, {{"tokens": token, "self_keys": keys, "self_values": values,
        "cross_keys": cross_keys, "cross_values": cross_values, "source_mask": mask}})
    log_probs[:, PAD] = -np.inf  # mt never outputs padding
    token = log_probs.argmax(-1)
    if token[0] == EOS:
        break
    out.append(int(token[0]))
print(sp_tgt.decode(out))
```""",
}


NOTES = {
    "ct2": "Sources get EOS appended and targets start with BOS by this model's config, as in mt. Greedy output "
           "equals mt's; CTranslate2's beam search normalises scores by length^alpha where mt uses GNMT's "
           "((5 + length) / 6)^alpha, so a few beam outputs differ.",
    "hf": "The model dimension is permuted to Marian's sinusoid layout (sines, then cosines), which leaves the "
          "function unchanged: greedy output and log-probabilities equal mt's. `generate`'s beam search "
          "normalises scores by length^alpha where mt uses GNMT's ((5 + length) / 6)^alpha.",
    "onnx": "Two graphs, no search: drive them with your own loop (greedy below) or with mt's search through "
            "`mt.export.onnx.OnnxModel`, which gives mt's own output.",
}


def _last_validation(run_dir: Path) -> dict[str, Any] | None:
    validations = [r for r in read_records(run_dir / "metrics.jsonl") if "valid_loss" in r]
    return validations[-1] if validations else None


def _test_scores(run_dir: Path, checkpoint: str) -> list[dict[str, Any]]:
    """The latest score of each test set `mt eval` recorded for `checkpoint` (a file name)."""
    fields = ("bleu", "chrf", "bleu_signature", "chrf_signature")
    by_test = {r.get("test", "?"): r for r in read_records(run_dir / "scores.jsonl")
               if r.get("checkpoint") == checkpoint and all(k in r for k in fields)}
    return list(by_test.values())


def model_card(checkpoint: Path, state: dict[str, Any], model: Transformer, cfg: Config, fmt: str,
               quantization: str | None, command: str) -> str:
    """The README.md text for `checkpoint` exported as `fmt`."""
    m, data = model.cfg, cfg.data
    run_dir = checkpoint.parent
    joint = state["vocab"]["tgt"] is None
    # The Hugging Face hub reads this front matter: the languages, the task, the library that loads it.
    library = {"ct2": "ctranslate2", "hf": "transformers", "onnx": "onnx"}[fmt]
    lines = [
        "---", f"language: [{data.src_lang}, {data.tgt_lang}]", "pipeline_tag: translation",
        f"library_name: {library}", "tags: [translation, transformer, mt]", "---", "",
        f"# {data.src_lang}→{data.tgt_lang} Transformer, trained with mt",
        "",
        f"A Transformer (Vaswani et al., 2017) translating {data.src_lang} into {data.tgt_lang}, trained with "
        f"mt and exported from `{checkpoint.name}` in the {fmt} format"
        f"{f' with {quantization} weights' if quantization else ' (float32 weights)'}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| languages | {data.src_lang} → {data.tgt_lang} |",
        f"| model | d_model {m.d_model}, {m.n_heads} heads, {m.n_layers} encoder + {m.decoder_layers} decoder layers, "
        f"d_ff {m.d_ff}, {m.norm}-norm, {model.num_parameters() / 1e6:.1f}M parameters |",
        f"| vocabulary | SentencePiece {data.spm_model_type}, {'joint' if joint else 'separate'}, "
        f"{model.src_vocab_size} / {model.tgt_vocab_size} pieces (source.spm, target.spm) |",
        f"| training data | `{data.train}` |",
        f"| dev data | `{data.valid or '-'}` |",
        f"| steps | {state.get('step', '?')}"
        + (f", the average of {len(state['averaged'])} checkpoints ({', '.join(Path(p).name for p in state['averaged'])})"
           if state.get("averaged") else "") + " |",
        f"| search defaults | beam {cfg.decode.beam_size}, GNMT length penalty {cfg.decode.length_penalty} |",
    ]
    valid = _last_validation(run_dir)
    if valid:
        bleu = f", greedy BLEU {valid['valid_bleu']:.2f}" if "valid_bleu" in valid else ""
        lines.append(f"| last validation | step {valid['step']}: loss {valid['valid_loss']:.3f}, "
                     f"perplexity {valid.get('valid_ppl', float('nan')):.2f}{bleu} |")
    tests = _test_scores(run_dir, checkpoint.name)
    if tests:
        lines += ["", "## Test scores (sacreBLEU, as `mt eval` measured them with mt's own search)", "",
                  "| test set | search | BLEU | chrF2 | signatures |", "| --- | --- | --- | --- | --- |"]
        for t in tests:
            lines.append(f"| `{t.get('test')}` | {t.get('search', '')} | {t['bleu']:.2f} | {t['chrf']:.2f} | "
                         f"`BLEU|{t['bleu_signature']}`, `chrF2|{t['chrf_signature']}` |")
    lines += ["", "## Use", "", NOTES[fmt], "", USAGE[fmt].format(dir=".", example=f"(a sentence in {data.src_lang})"), "",
              "## Made by", "", "```bash", command or f"mt export --checkpoint {checkpoint} --format {fmt}", "```", ""]
    return "\n".join(lines)
