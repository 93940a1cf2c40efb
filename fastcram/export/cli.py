"""Flags of `fastcram export hf` (the CLI adds this parser to its subcommands)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a trained run for other libraries")
    esub = p.add_subparsers(dest="export_cmd", required=True)
    h = esub.add_parser("hf", help="a self-contained Hugging Face transformers folder: safetensors weights, "
                                   "config, modeling code, tokenizer (needs pip install -e '.[hf]')")
    h.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `fastcram train`")
    h.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist, or be empty)")
    h.add_argument("--checkpoint", metavar="FILE", help="the checkpoint to export (default: the run's newest "
                                                        "usable one; failing ones are named and passed over)")
    h.add_argument("--trust-checkpoint", action="store_true",
                   help="read a checkpoint without a verifiable record (version 1) by full unpickling, which can "
                        "run code: only for a file you vouch for")
    h.add_argument("--tokenizer", metavar="FILE", help="the run's tokenizer.json, if its data folder moved")
    h.add_argument("--quiet", action="store_true", help="no progress line")
    h.set_defaults(func=cmd_export_hf)


def cmd_export_hf(args) -> int:
    from .hf import ExportOptions, export_hf  # torch and the model load only when the command runs

    export_hf(ExportOptions(run_dir=args.run_dir, out=args.out, checkpoint=args.checkpoint,
                            tokenizer=args.tokenizer, trust_checkpoint=args.trust_checkpoint,
                            progress=not args.quiet))
    return 0
