"""Command line: argparse subcommands that turn flags into config objects and call the library."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import PRESETS, DataConfig, TrainConfig, preset
from .errors import UserError


def _positive_float(flag: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} needs a number, got {s!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {s}")
        return v
    return parse


def _positive_int(flag: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} needs a whole number, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {s}")
        return v
    return parse


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train crammed BERT until the wall-clock budget is spent")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--hours", type=_positive_float("--hours"), help="budget in hours (default 24)")
    budget.add_argument("--minutes", type=_positive_float("--minutes"), help="budget in minutes")
    p.add_argument("--preset", choices=list(PRESETS), help="model preset (default: crammed-bert with a GPU, "
                                                            "tiny without)")
    p.add_argument("--data", help="a folder made by `fastcram data prepare` (default: the built-in corpus)")
    p.add_argument("--out", help="run folder (default runs/<time>-<preset>)")
    p.add_argument("--kernels", choices=["torch", "triton"], default="torch", help="ops backend")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the model (default on GPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="run eagerly (default on CPU)")
    p.add_argument("--micro-batch", type=_positive_int("--micro-batch"), help="sequences per forward/backward")
    p.add_argument("--final-batch", type=_positive_int("--final-batch"),
                   help="sequences per optimizer step at the end of the batch ramp (recipe: 8192)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run with the budget it has already spent")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-interval", type=_positive_float("--log-interval"), help="seconds between log records")
    p.add_argument("--checkpoint-interval", type=_positive_float("--checkpoint-interval"),
                   help="seconds between checkpoints")
    p.add_argument("--peak-tflops", type=_positive_float("--peak-tflops"),
                   help="dense bf16 peak of the GPU for MFU, when fastcram's table lacks it")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import torch

    from .train import RunOptions, train

    gpu = torch.cuda.is_available() and args.device != "cpu"
    name = args.preset or ("crammed-bert" if gpu else "tiny")
    if not args.preset and not args.resume:
        print(f"fastcram: no --preset given: using {name} ({'a GPU is' if gpu else 'no GPU is'} visible)",
              file=sys.stderr)
    tcfg = dataclasses.replace(TrainConfig(), **preset(name).train_overrides)
    hours = args.hours if args.hours is not None else (args.minutes / 60 if args.minutes is not None else 24.0)
    tcfg.budget_s = hours * 3600.0
    tcfg.kernels, tcfg.device, tcfg.seed = args.kernels, args.device, args.seed
    tcfg.compile = gpu if args.compile is None else args.compile
    for flag, field in (("micro_batch", "micro_batch"), ("final_batch", "final_batch"),
                        ("log_interval", "log_interval_s"), ("checkpoint_interval", "checkpoint_interval_s")):
        if getattr(args, flag) is not None:
            setattr(tcfg, field, getattr(args, flag))
    opts = RunOptions(train=tcfg, preset=name, data_dir=args.data, out_dir=args.out, resume=args.resume,
                      budget_given=args.hours is not None or args.minutes is not None,
                      progress=not args.quiet, peak_tflops=args.peak_tflops)
    summary = train(opts)
    return 0 if summary else 1


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_cmd", required=True)
    t = tsub.add_parser("train", help="train a WordPiece tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH", help="text files or folders")
    t.add_argument("--out", required=True, metavar="FILE", help="where to write tokenizer.json")
    t.add_argument("--vocab-size", type=_positive_int("--vocab-size"), default=32768)
    t.set_defaults(func=cmd_tokenizer_train)


def cmd_tokenizer_train(args) -> int:
    from .data import find_text_files, iter_documents
    from .tokenizer import train_tokenizer

    if not 16 <= args.vocab_size <= 65535:
        raise UserError(f"--vocab-size {args.vocab_size}: must be between 16 and 65535")
    files = find_text_files(args.input)
    tok = train_tokenizer(iter_documents(files, DataConfig().doc_chars), args.vocab_size, args.out)
    print(f"wrote {args.out}: vocabulary {tok.get_vocab_size()}", file=sys.stderr)
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    d = dsub.add_parser("prepare", help="tokenise, filter and pack a corpus into shards")
    d.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt, .txt.xz, .txt.gz, .jsonl files or folders of them")
    d.add_argument("--out", required=True, metavar="DIR")
    d.add_argument("--tokenizer", metavar="FILE", help="an existing tokenizer.json (default: train one)")
    d.add_argument("--vocab-size", type=_positive_int("--vocab-size"), default=32768)
    d.add_argument("--compression-threshold", type=_positive_float("--compression-threshold"), default=0.25,
                   help="drop documents with tokens/characters >= this")
    d.add_argument("--seq-len", type=_positive_int("--seq-len"), default=128)
    d.set_defaults(func=cmd_data_prepare)


def cmd_data_prepare(args) -> int:
    from .data import prepare

    if not 16 <= args.vocab_size <= 65535:
        raise UserError(f"--vocab-size {args.vocab_size}: must be between 16 and 65535")
    cfg = DataConfig(vocab_size=args.vocab_size, compression_threshold=args.compression_threshold,
                     seq_len=args.seq_len)
    prepare(args.input, args.out, cfg, tokenizer_path=args.tokenizer)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcram", description="Train crammed BERT on one GPU in a day, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_tokenizer(sub)
    _add_data(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with one line for malformed flags
    try:
        return args.func(args)
    except UserError as e:
        print(f"fastcram: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastcram: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
