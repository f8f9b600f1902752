"""What an export keeps: one checkpoint exported with `mt export` and run by each engine on the same test set.

    pip install -e ".[export]" -c <(echo torch==$(python -c 'import torch; print(torch.__version__)'))
    python scripts/bench_export.py --checkpoint runs/multi30k-de-en/checkpoint_avg.pt

Exports the checkpoint as CTranslate2 float32 and int8, Hugging Face Marian and ONNX (into --work), then
translates --src with greedy search and with beam 4 in: mt itself, CTranslate2 (float32, int8), transformers'
`generate` and onnxruntime (the ONNX graphs driven by mt's own search). Prints sacreBLEU of each output
against --ref and the share of lines identical to mt's output with the same search. Each engine uses its own
beam search where it has one: CTranslate2 and HF normalise scores by length^0.6 where mt uses GNMT's
((5 + length) / 6)^0.6, so their beam outputs may differ from mt's where their greedy ones should not.
Every engine stops at mt's default output limit (source length + 50); CTranslate2 and HF, which take one
limit per call, get sentences batched by source length.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k"
BATCH = 64  # sentences per call for CTranslate2 and HF
MAX_LEN_B = 50  # mt's default output limit: source length (with EOS) + 50, EOS included
ALPHA = 0.6


def batches_by_limit(pieces: list[list[str]], size: int = BATCH):
    """(indices, mt's output limit with EOS) of batches of at most `size` sentences that share a limit, since
    CTranslate2 and HF take one limit per call and mt has one per sentence (source length + 50 by default)."""
    by_limit: dict[int, list[int]] = {}
    for i, p in enumerate(pieces):
        by_limit.setdefault(len(p) + 1 + MAX_LEN_B, []).append(i)  # + EOS
    for limit, indices in sorted(by_limit.items()):
        for j in range(0, len(indices), size):
            yield indices[j:j + size], limit


def mt_translator(checkpoint: Path, beam: int):
    from mt.translate import load_translator

    method = "greedy" if beam == 1 else "beam"
    return load_translator(checkpoint, search_overrides=[f"decode.method={method}", f"decode.beam_size={beam}",
                                                         f"decode.length_penalty={ALPHA}"])


def run_mt(checkpoint: Path, sources: list[str], beam: int) -> list[str]:
    from mt.translate import translate_lines

    return translate_lines(mt_translator(checkpoint, beam), sources)


def run_onnx(directory: Path, checkpoint: Path, sources: list[str], beam: int, threads: int) -> list[str]:
    """The ONNX graphs in place of mt's model, under mt's own batching and search."""
    from mt.export.onnx import OnnxModel
    from mt.translate import Translator, translate_lines

    t = mt_translator(checkpoint, beam)
    return translate_lines(Translator(OnnxModel(directory, threads), t.vocab, t.decode, t.device), sources)


def run_ct2(directory: Path, sources: list[str], beam: int, threads: int) -> list[str]:
    import ctranslate2
    import sentencepiece as spm

    src_spm = spm.SentencePieceProcessor(model_file=str(directory / "source.spm"))
    tgt_spm = spm.SentencePieceProcessor(model_file=str(directory / "target.spm"))
    translator = ctranslate2.Translator(str(directory), device="cpu", intra_threads=threads)
    pieces = src_spm.encode(sources, out_type=str)
    out = [""] * len(sources)
    for indices, limit in batches_by_limit(pieces):
        # CTranslate2's limit counts the tokens before EOS.
        results = translator.translate_batch([pieces[i] for i in indices], beam_size=beam, length_penalty=ALPHA,
                                             max_decoding_length=limit - 1)
        for i, r in zip(indices, results):
            out[i] = tgt_spm.decode(r.hypotheses[0])
    return out


def run_hf(directory: Path, sources: list[str], beam: int) -> list[str]:
    from transformers import MarianMTModel, MarianTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = MarianTokenizer.from_pretrained(directory)
    model = MarianMTModel.from_pretrained(directory).eval()
    pieces = [tokenizer.tokenize(s) for s in sources]
    out = [""] * len(sources)
    for indices, limit in batches_by_limit(pieces):
        batch = tokenizer([sources[i] for i in indices], return_tensors="pt", padding=True)
        with torch.inference_mode():  # max_length counts the start token
            generated = model.generate(**batch, num_beams=beam, do_sample=False, length_penalty=ALPHA,
                                       max_length=limit + 1)
        for i, text in zip(indices, tokenizer.batch_decode(generated, skip_special_tokens=True)):
            out[i] = text
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--src", type=Path, default=DATA / "test_2016_flickr.de")
    parser.add_argument("--ref", type=Path, default=DATA / "test_2016_flickr.en")
    parser.add_argument("--work", type=Path, help="where the exports go (default: beside the checkpoint)")
    parser.add_argument("--lines", type=int, default=0, help="only the first N lines (0: all)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    from mt.evaluate import score
    from mt.export import export
    from mt.io import read_lines

    torch.set_num_threads(args.threads)
    sources, refs = list(read_lines(args.src)), list(read_lines(args.ref))
    if args.lines:
        sources, refs = sources[:args.lines], refs[:args.lines]
    work = args.work or args.checkpoint.parent / "exports"
    dirs = {}
    for name, fmt, quantization in [("ct2", "ct2", None), ("ct2-int8", "ct2", "int8"), ("hf", "hf", None),
                                    ("onnx", "onnx", None)]:
        dirs[name] = export(args.checkpoint, fmt, work / name, quantization, force=True)
        print(f"exported {name} -> {dirs[name]}", file=sys.stderr)

    systems = {
        "mt": lambda beam: run_mt(args.checkpoint, sources, beam),
        "CTranslate2 float32": lambda beam: run_ct2(dirs["ct2"], sources, beam, args.threads),
        "CTranslate2 int8": lambda beam: run_ct2(dirs["ct2-int8"], sources, beam, args.threads),
        "HF generate": lambda beam: run_hf(dirs["hf"], sources, beam),
        "onnxruntime (mt's search)": lambda beam: run_onnx(dirs["onnx"], args.checkpoint, sources, beam,
                                                           args.threads),
    }
    rows = []
    for beam in (1, 4):
        outputs = {}
        for name, run in systems.items():
            print(f"{name}, {'greedy' if beam == 1 else f'beam {beam}'} ...", file=sys.stderr)
            outputs[name] = run(beam)
        for name, hyps in outputs.items():
            same = sum(a == b for a, b in zip(hyps, outputs["mt"])) / len(hyps)
            scores = score(hyps, refs)
            rows.append((name, "greedy" if beam == 1 else f"beam {beam}", scores.bleu, same))
    signature = scores.bleu_signature
    print(f"\n{args.checkpoint}, {args.src.name} ({len(sources)} lines), {args.threads} threads, torch "
          f"{torch.__version__}\n")
    print("| engine | search | BLEU | lines identical to mt's |")
    print("| --- | --- | --- | --- |")
    for name, search, bleu, same in rows:
        print(f"| {name} | {search} | {bleu:.2f} | {100 * same:.1f}% |")
    print(f"\nBLEU|{signature}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
