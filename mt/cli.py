"""The `mt` command line: one sub-command, one function call.

User mistakes raise `MTError` anywhere below; they are printed here as one line (`mt: error: ...`) with exit
status 2. A traceback is shown only with `--debug`. Results go to stdout, logs and progress to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from mt import __version__
from mt.errors import MTError

log = logging.getLogger("mt")

# `mt train` stopped by SIGTERM or SIGUSR1 with its checkpoint written: `--resume` continues it (BSD's EX_TEMPFAIL,
# "try again later", for a job script that requeues itself).
EXIT_PREEMPTED = 75

EPILOG_TRAIN = """examples:
  mt train --config configs/multi30k.yaml
  mt train --config configs/multi30k.yaml --set train.max_time_minutes=10 --set model.dropout=0.2
  mt train --config configs/multi30k.yaml --resume          # continue from run_dir/checkpoint_last.pt
  mt train --config configs/multi30k.yaml --prepare-only    # vocabulary, encoded cache, batch statistics
"""

EPILOG_TRANSLATE = """examples:
  mt translate --checkpoint runs/multi30k-de-en/checkpoint_avg.pt --input test.de --output test.hyp.en
  cat test.de | mt translate --checkpoint runs/multi30k-de-en/checkpoint_best.pt --beam-size 5 > out.en
  mt translate --checkpoint run1/checkpoint_avg.pt run2/checkpoint_avg.pt --input test.de   # an ensemble
  mt translate --checkpoint CKPT --input test.de --prefix starts.en       # each output starts with its line
  mt translate --checkpoint CKPT --input test.de --alignment              # 'text ||| 0-0 1-2 ...'
  mt translate --checkpoint CKPT --input test.de --nbest 4 --nbest-format moses
"""

EPILOG_SERVE = """examples:
  mt serve --checkpoint runs/multi30k-de-en/checkpoint_avg.pt --port 8080
  curl -s localhost:8080/translate -d '{"text": ["Ein Hund rennt."], "nbest": 2, "alignment": true}'
"""

EPILOG_SCORE = """examples:
  mt score --checkpoint runs/multi30k-de-en/checkpoint_avg.pt --src corpus.de --tgt corpus.en > scores.tsv
"""

EPILOG_EXPORT = """examples:
  mt export --checkpoint runs/multi30k-de-en/checkpoint_avg.pt --format ct2 --output exports/de-en-ct2
  mt export --checkpoint runs/multi30k-de-en/checkpoint_avg.pt --format ct2 --quantization int8 --output exports/de-en-ct2-int8
  mt export --checkpoint runs/multi30k-de-en/checkpoint_avg.pt --format hf --output exports/de-en-hf
  mt export --checkpoint runs/multi30k-de-en/checkpoint_avg.pt --format onnx --output exports/de-en-onnx
"""

EPILOG_EVAL = """examples:
  mt eval --hyp out.en --ref test.en
  mt eval --checkpoint runs/multi30k-de-en/checkpoint_avg.pt --src test.de --ref test.en
  mt eval --checkpoint runs/wmt14-en-de-base/checkpoint_avg.pt -t wmt14 -l en-de
"""

EPILOG_SEE = """examples:
  mt plot runs/multi30k-de-en runs/multi30k-auto --output curves.png     # or curves.svg
  mt attention --checkpoint runs/multi30k-de-en/checkpoint_avg.pt --src "Ein Hund rennt." --output att.png
  mt attention --checkpoint runs/multi30k-de-en/checkpoint_avg.pt --src "Ein Hund rennt." --tgt "A dog runs." --output att.png
  mt report runs/multi30k-de-en                                          # -> runs/multi30k-de-en/report.md
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mt", description="Train, run and score Transformer translation models (Vaswani et al., 2017).")
    parser.add_argument("--version", action="version", version=f"mt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(command_parser: argparse.ArgumentParser) -> None:
        command_parser.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
            help="override one config value (repeatable), e.g. --set train.max_steps=2000")
        command_parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        command_parser.add_argument("--quiet", action="store_true", help="log warnings only")

    fmt = argparse.RawDescriptionHelpFormatter
    train_parser = sub.add_parser(
        "train", help="learn the vocabulary, encode the data and train a model",
        description="Train a model from a YAML config; writes everything to the config's run_dir.",
        epilog=EPILOG_TRAIN, formatter_class=fmt)
    train_parser.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    train_parser.add_argument("--resume", action="store_true", help="continue from run_dir/checkpoint_last.pt")
    train_parser.add_argument("--prepare-only", action="store_true",
                              help="stop after the vocabulary, the encoded cache and the batch statistics")
    common(train_parser)

    translate_parser = sub.add_parser(
        "translate", help="translate a file or stdin with a trained checkpoint",
        description="Translate one sentence per line; output keeps input order and line count.",
        epilog=EPILOG_TRANSLATE, formatter_class=fmt)
    translate_parser.add_argument("--checkpoint", required=True, nargs="+",
                                  help="a checkpoint written by mt train or mt average; several: an ensemble")
    translate_parser.add_argument("--input", default="-",
                                  help="source text, one sentence per line (default: stdin)")
    translate_parser.add_argument("--output", default="-", help="where to write translations (default: stdout)")
    _search_options(translate_parser)
    translate_parser.add_argument("--nbest", type=int,
                                  help="write the N best hypotheses per line as 'line ||| text ||| score'")
    translate_parser.add_argument("--nbest-format", choices=("plain", "moses", "json"), default="plain",
                                  help="moses: 'line ||| text ||| logprob= L length= N ||| score'; json: one "
                                       "object per input line (default: plain)")
    translate_parser.add_argument("--prefix", help="a file of target prefixes, one per input line (may be "
                                                   "empty): each translation starts with its prefix")
    translate_parser.add_argument("--alignment", action="store_true",
                                  help="add word alignments, ' ||| 0-0 1-2 ...' (source-target word indices)")
    translate_parser.add_argument("--buffer-lines", type=int,
                                  help="lines to read before translating them (default: 1 when stdin is a "
                                       "terminal, else 10000); 1 answers each line as it comes")
    common(translate_parser)

    serve_parser = sub.add_parser(
        "serve", help="an HTTP JSON translation service with a page to try it",
        description="POST /translate, GET /health, GET / (a page). Requests are queued and translated together.",
        epilog=EPILOG_SERVE, formatter_class=fmt)
    serve_parser.add_argument("--checkpoint", required=True, nargs="+",
                              help="a checkpoint written by mt train or mt average; several: an ensemble")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve_parser.add_argument("--max-sentences", type=int, default=64, help="sentences per request (default 64)")
    serve_parser.add_argument("--max-length", type=int, default=256,
                              help="source tokens per sentence, and target tokens per prefix (default 256)")
    _search_options(serve_parser)
    common(serve_parser)

    score_parser = sub.add_parser(
        "score", help="the log-probability of each sentence pair under a checkpoint",
        description="One line per pair, in order: the total log-probability of the target (EOS included) "
                    "given the source, a tab, and the same per target token.",
        epilog=EPILOG_SCORE, formatter_class=fmt)
    score_parser.add_argument("--checkpoint", required=True, help="a checkpoint written by mt train or mt average")
    score_parser.add_argument("--src", required=True, help="source sentences, one per line")
    score_parser.add_argument("--tgt", required=True, help="target sentences, as many lines")
    score_parser.add_argument("--output", default="-", help="where to write the scores (default: stdout)")
    score_parser.add_argument("--max-tokens", type=int, help="tokens per batch (default: decode.max_tokens)")
    score_parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    common(score_parser)

    eval_parser = sub.add_parser(
        "eval", help="score translations with sacreBLEU (BLEU and chrF)",
        description="Score a hypothesis file, or translate then score, with sacreBLEU.",
        epilog=EPILOG_EVAL, formatter_class=fmt)
    eval_parser.add_argument("--hyp", help="hypothesis file to score")
    eval_parser.add_argument("--ref", nargs="+", help="reference file(s)")
    eval_parser.add_argument("--checkpoint", nargs="+",
                             help="translate --src (or the -t test set) with this checkpoint first (several: "
                                  "an ensemble)")
    eval_parser.add_argument("--src", help="source file to translate (with --checkpoint)")
    eval_parser.add_argument("-t", "--test-set",
                             help="a sacreBLEU test set by name, e.g. wmt14 (with --checkpoint)")
    eval_parser.add_argument("-l", "--language-pair", help="the test set's language pair, e.g. en-de")
    eval_parser.add_argument("--output", help="also write the translations here (with --checkpoint)")
    _search_options(eval_parser)
    common(eval_parser)

    average_parser = sub.add_parser(
        "average", help="average the parameters of several checkpoints (Section 6.1)",
        description="Average the last N checkpoints of a run, or a given list, into one.")
    average_parser.add_argument("--run-dir", help="take the last --last step checkpoints of this run directory")
    average_parser.add_argument("--last", type=int, default=5, help="how many checkpoints to average (default 5)")
    average_parser.add_argument("--checkpoints", nargs="+", help="explicit list of checkpoints to average")
    average_parser.add_argument("--output",
                                help="where to write the average (default: RUN_DIR/checkpoint_avg.pt)")
    common(average_parser)

    plot_parser = sub.add_parser(
        "plot", help="draw learning curves of one or more runs (needs the plot extra)",
        description="Loss, perplexity, dev BLEU, learning rate and tokens/s against step and hours, one line per "
                    "run and metric. Needs matplotlib: pip install -e \".[plot]\".",
        epilog=EPILOG_SEE, formatter_class=fmt)
    plot_parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    plot_parser.add_argument("--output", required=True, help="the picture: .png, .svg or .pdf")
    common(plot_parser)

    attention_parser = sub.add_parser(
        "attention", help="draw every layer's and head's attention for one sentence (needs the plot extra)",
        description="Encoder self-attention, decoder self-attention and cross-attention of every layer and head, "
                    "from the model's forward pass, for its own translation of --src or for --tgt.",
        epilog=EPILOG_SEE, formatter_class=fmt)
    attention_parser.add_argument("--checkpoint", required=True, help="a checkpoint written by mt train or mt average")
    attention_parser.add_argument("--src", required=True, help="the source sentence")
    attention_parser.add_argument("--tgt", help="the target sentence (default: the model's own translation)")
    attention_parser.add_argument("--output", required=True, help="the picture: .png, .svg or .pdf")
    _search_options(attention_parser)
    common(attention_parser)

    report_parser = sub.add_parser(
        "report", help="write RUN_DIR/report.md: config, curves, dev and test scores, speed, hardware",
        description="Write RUN_DIR/report.md and RUN_DIR/curves.png. Needs matplotlib: pip install -e \".[plot]\".",
        epilog=EPILOG_SEE, formatter_class=fmt)
    report_parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory mt train wrote")
    common(report_parser)

    export_parser = sub.add_parser(
        "export", help="write a checkpoint as a CTranslate2, Hugging Face (Marian) or ONNX model",
        description="Export a checkpoint for another inference stack, with its SentencePiece models and a "
                    "README.md model card. Needs the export extra: pip install -e \".[export]\".",
        epilog=EPILOG_EXPORT, formatter_class=fmt)
    export_parser.add_argument("--checkpoint", required=True, help="a checkpoint written by mt train or mt average")
    export_parser.add_argument("--format", required=True, choices=("ct2", "hf", "onnx"),
                               help="ct2: ctranslate2.Translator; hf: MarianMTModel.from_pretrained; onnx: onnxruntime")
    export_parser.add_argument("--output", required=True, help="the directory to create")
    export_parser.add_argument(
        "--quantization", choices=("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
                                   "bfloat16"),
        help="weight type (default float32): ct2 takes any; hf float16 or bfloat16; onnx int8 (dynamic)")
    export_parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    common(export_parser)
    return parser


def _search_options(command_parser: argparse.ArgumentParser) -> None:
    command_parser.add_argument("--beam-size", type=int,
                                help="beam width (default: the checkpoint's decode.beam_size)")
    command_parser.add_argument("--length-penalty", type=float,
                                help="GNMT length penalty alpha (default: decode.length_penalty)")
    command_parser.add_argument("--method", choices=("beam", "greedy", "sample"),
                                help="search method (default: beam)")
    command_parser.add_argument("--max-tokens", type=int,
                                help="source tokens per batch (default: decode.max_tokens)")
    command_parser.add_argument(
        "--precision", choices=("fp32", "bf16", "int8", "auto"),
        help="weights to search with: bf16 is faster on GPUs and CPUs with bf16 matmuls; auto picks it "
             "where they have them; int8 (CPU): linear layers with int8 weights (default: decode.precision, fp32)")
    command_parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except MTError as e:
        if args.debug:
            raise
        print(f"mt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mt: interrupted", file=sys.stderr)
        return 130


def cmd_train(args: argparse.Namespace) -> int:
    from mt.config import load_config, save_config

    cfg = load_config(args.config, args.overrides)  # before importing torch: config mistakes fail fast

    import torch

    from mt.data import batch_stats, make_batches, prepare_data
    from mt.runtime import init_distributed, keep_freed_memory, resolve_device
    from mt.train import train

    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MTError(f"run_dir {run_dir}: exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun, rank 0 learns the vocabulary and writes the cache while the others wait, then reuse it.
    device = None if args.prepare_only else resolve_device(cfg.train.device)  # a login node may lack the GPU
    rank, world = (0, 1) if device is None else init_distributed(device)
    if rank > 0:
        torch.distributed.barrier()
    else:
        save_config(cfg, run_dir / "config.yaml")
    data = prepare_data(cfg.data, run_dir)
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    if rank == 0:
        stats = batch_stats(make_batches(data.train.src_lens, data.train.tgt_lens, cfg.data.max_tokens,
                                         cfg.train.seed, 0), data.train.src_lens, data.train.tgt_lens)
        print(f"vocabulary: {data.vocab.src_size} pieces ({'joint' if data.vocab.joint else 'separate'}) in {run_dir}")
        print(f"train: {len(data.train)} pairs; dev: {len(data.valid) if data.valid else 0} pairs")
        print(f"batches at {cfg.data.max_tokens} tokens per side: {stats}"
              + (f" ({world} processes: global batch = {world} x update_freq {cfg.train.update_freq} batches)"
                 if world > 1 else ""))
    if args.prepare_only:
        return 0
    keep_freed_memory(device)

    result = train(cfg, data, resume=args.resume)
    if rank == 0:
        for line in result.summary():
            print(line)
    code = EXIT_PREEMPTED if result.preempted else 0
    if world > 1:
        torch.distributed.barrier()  # rank 0 may still be writing checkpoints: leave together
        torch.distributed.destroy_process_group()
        # Everything is written and the group is gone: skip the interpreter's teardown, where gloo's threads can
        # abort the process (pytorch PR 179291; a rank died so once in CI, 'terminate called without an active
        # exception').
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_translate(args: argparse.Namespace) -> int:
    from mt.translate import load_translator, translate_stream

    if args.nbest is not None and args.nbest < 1:
        raise MTError(f"--nbest must be at least 1, got {args.nbest}")
    translator = load_translator(args.checkpoint, args.overrides, _search_overrides(args), args.device)
    translate_stream(translator, args.input, args.output, nbest=args.nbest, nbest_format=args.nbest_format,
                     alignment=args.alignment, prefix=args.prefix, buffer_lines=args.buffer_lines)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mt.serve.app import Limits, require_serve, serve
    from mt.translate import load_translator

    require_serve()  # before the model is loaded
    if args.max_sentences < 1 or args.max_length < 1:
        raise MTError("--max-sentences and --max-length must be at least 1")
    translator = load_translator(args.checkpoint, args.overrides, _search_overrides(args), args.device)
    name = " + ".join(Path(c).name for c in args.checkpoint)
    serve(translator, args.host, args.port, Limits(args.max_sentences, args.max_length), name)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from mt.score import load_scorer, score_file

    scorer = load_scorer(args.checkpoint, args.device, args.max_tokens)
    score_file(scorer, args.src, args.tgt, args.output)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mt.evaluate import load_test_set, read_hyp_ref, record_scores, score

    if args.checkpoint is None:
        if not args.hyp or not args.ref:
            raise MTError("eval needs --hyp and --ref, or --checkpoint with --src/--ref or -t/-l")
        hyps, refs = read_hyp_ref(args.hyp, args.ref)
    else:
        from mt.translate import load_translator, translate_lines, write_lines

        if args.test_set:
            if not args.language_pair:
                raise MTError("-t/--test-set needs -l/--language-pair, e.g. -t wmt14 -l en-de")
            sources, refs = load_test_set(args.test_set, args.language_pair)
        else:
            if not args.src or not args.ref:
                raise MTError("eval --checkpoint needs --src and --ref, or -t and -l")
            sources, refs = read_hyp_ref(args.src, args.ref)  # also checks that the line counts match
        translator = load_translator(args.checkpoint, args.overrides, _search_overrides(args), args.device)
        hyps = translate_lines(translator, sources)
        if args.output:
            write_lines(args.output, hyps)
    scores = score(hyps, refs)
    for line in scores.format():
        print(line)
    if args.checkpoint is not None:
        test = f"{args.test_set} {args.language_pair}" if args.test_set else args.src
        record_scores([Path(c) for c in args.checkpoint], test, scores, translator.decode)
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from mt.checkpoint import average_checkpoints, last_checkpoints

    if args.checkpoints:
        paths = [Path(p) for p in args.checkpoints]
    elif args.run_dir:
        paths = last_checkpoints(Path(args.run_dir), args.last)
    else:
        raise MTError("average needs --run-dir (with --last N) or --checkpoints A B ...")
    output = Path(args.output) if args.output else (Path(args.run_dir or paths[0].parent) / "checkpoint_avg.pt")
    average_checkpoints(paths, output)
    print(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) -> {output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mt.export import export

    command = shlex.join(["mt", *args.argv])  # for the model card
    output = export(args.checkpoint, args.format, args.output, args.quantization, args.force, command)
    print(f"exported {args.checkpoint} as {args.format}"
          f"{f' ({args.quantization})' if args.quantization else ''} -> {output}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from mt.plot import learning_curves, pyplot, save_figure

    pyplot()  # a missing extra fails before the runs are read
    output = save_figure(learning_curves(args.run_dirs), args.output)
    print(f"learning curves of {len(args.run_dirs)} run(s) -> {output}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from mt.plot import attention_figure, attention_inputs, pyplot, save_figure
    from mt.translate import load_translator

    pyplot()
    translator = load_translator(args.checkpoint, args.overrides, _search_overrides(args), args.device)
    src, tgt_in = attention_inputs(translator.model, translator.vocab, args.src, args.tgt, translator.decode)
    figure, picture = attention_figure(translator.model, translator.vocab, src.to(translator.device),
                                       tgt_in.to(translator.device))
    output = save_figure(figure, args.output)
    print(f"{' '.join(picture.source)} -> {' '.join(picture.target_out)}")
    print(f"{len(picture.panels)} attention maps -> {output}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mt.plot import pyplot
    from mt.report import write_report

    pyplot()
    print(f"report -> {write_report(args.run_dir, shlex.join(['mt', *args.argv]))}")
    return 0


def _search_overrides(args: argparse.Namespace) -> list[str]:
    pairs = {"beam_size": args.beam_size, "length_penalty": args.length_penalty, "method": args.method,
             "max_tokens": args.max_tokens, "nbest": getattr(args, "nbest", None), "precision": args.precision}
    return [f"decode.{k}={v}" for k, v in pairs.items() if v is not None]


COMMANDS = {"train": cmd_train, "translate": cmd_translate, "serve": cmd_serve, "score": cmd_score, "eval": cmd_eval,
            "average": cmd_average, "export": cmd_export, "plot": cmd_plot, "attention": cmd_attention,
            "report": cmd_report}
