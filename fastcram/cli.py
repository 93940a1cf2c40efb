"""Command line: argparse subcommands that turn flags into config objects and call the library."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import sys

from .config import PRESETS, DataConfig, RunOptions, TrainConfig, preset
from .config import non_negative_int as _non_negative_int, positive_float as _positive_float
from .config import positive_int as _positive_int
from .errors import UserError
from .files import WriteError, check_output_dir, check_output_file, os_error_text


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2 (argparse's default prints the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _micro_batch(s: str):
    return "auto" if s == "auto" else _positive_int("--micro-batch")(s)


def _add_train(sub) -> None:
    from .config import eval_every as _eval_every

    p = sub.add_parser("train", help="train crammed BERT until the wall-clock budget is spent")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--hours", type=_positive_float("--hours"), help="budget in hours (default 24)")
    budget.add_argument("--minutes", type=_positive_float("--minutes"), help="budget in minutes")
    p.add_argument("--preset", choices=list(PRESETS), help="model preset (default: crammed-bert with a GPU, "
                                                            "tiny without)")
    p.add_argument("--data", help="a folder made by `fastcram data prepare` (default: the built-in corpus)")
    p.add_argument("--out", help="run folder (default runs/<time>-<preset>)")
    p.add_argument("--kernels", choices=["torch", "triton", "auto"],
                   help="ops backend; auto: chosen op by op by timing whole training steps at start-up (default "
                        "auto on a GPU, torch on a CPU)")
    p.add_argument("--norm-kernels", choices=["torch", "triton", "cuda"],
                   help="backend of the two LayerNorm ops only; cuda = the native kernels built with CMake")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the model (default on GPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="run eagerly (default on CPU)")
    p.add_argument("--micro-batch", type=_micro_batch, help="sequences per forward/backward, or auto "
                                                             "(searched at start-up, charged to the budget)")
    p.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs", "reduce-overhead", "auto"],
                   help="torch.compile mode; reduce-overhead captures CUDA graphs (default auto on a GPU)")
    p.add_argument("--attention", choices=["default", "flash", "cudnn", "efficient", "math", "auto"],
                   help="scaled-dot-product attention backend; default: PyTorch's own choice (default auto on a "
                        "GPU, default on a CPU)")
    p.add_argument("--residual-dtype", choices=["fp32", "bf16"],
                   help="dtype of the residual stream under bf16 autocast (default fp32)")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"],
                   help="mixed precision: auto = bf16 on a GPU, off on a CPU (default auto)")
    p.add_argument("--sparse-last-layer", choices=["on", "off"],
                   help="run the last block only at the predicted rows (exact; default on)")
    p.add_argument("--retune", action="store_true",
                   help="ignore the tuning cache: measure the auto switches again")
    p.add_argument("--final-batch", type=_positive_int("--final-batch"),
                   help="sequences per optimizer step at the end of the batch ramp (recipe: 8192)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run with the budget it has already spent")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="with --resume: also read a checkpoint without checksum (version 1) by full unpickling, "
                        "which can run code; only for checkpoints you made yourself")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--gpus", type=_positive_int("--gpus"), default=1,
                   help="data-parallel over this many local GPUs (starts torchrun for you)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-interval", type=_positive_float("--log-interval"), help="seconds between log records")
    p.add_argument("--checkpoint-interval", type=_positive_float("--checkpoint-interval"),
                   help="seconds between checkpoints")
    p.add_argument("--peak-tflops", type=_positive_float("--peak-tflops"),
                   help="dense bf16 peak of the GPU for MFU, when fastcram's table lacks it")
    p.add_argument("--max-steps", type=_positive_int("--max-steps"),
                   help="also stop after this many optimizer steps (smoke tests, profiling)")
    p.add_argument("--profile-steps", metavar="A:B", help="record optimizer steps A..B-1 with torch.profiler "
                                                           "(chrome trace + memory snapshot in the run folder)")
    p.add_argument("--telemetry-interval", type=_positive_float("--telemetry-interval"), default=5.0,
                   help="seconds between GPU telemetry samples")
    p.add_argument("--lr", type=_positive_float("--lr"), help="peak learning rate (recipe: 1e-3)")
    p.add_argument("--deterministic", action="store_true",
                   help="bit-identical reruns and resumes on CPU; needs --max-steps (schedules follow steps)")
    p.add_argument("--verify-data", action="store_true",
                   help="verify every shard at start (default: each on the loader's thread before its first use)")
    p.add_argument("--keep-checkpoints", type=_positive_int("--keep-checkpoints"),
                   help="periodic checkpoints kept besides final.pt (default 2)")
    p.add_argument("--stop-on-checkpoint-error", action="store_true",
                   help="stop cleanly when a checkpoint cannot be written (default: report it and train on, and stop "
                        "when none could be written for 10%% of the budget)")
    p.add_argument("--max-bad-steps", type=_positive_int("--max-bad-steps"),
                   help="stop after this many consecutive non-finite steps (default 20)")
    p.add_argument("--eval-every", type=_eval_every, metavar="S|P%",
                   help="held-out MLM loss every S seconds of budget, or each time the budget spent has grown by "
                        "P%% (a time read off the evaluations is then known to P%%); 0: no evaluation. Off the "
                        "budget clock (default: every 2%% of the budget, at least 10 s apart)")
    p.add_argument("--eval-blocks", type=_positive_int("--eval-blocks"),
                   help="held-out blocks evaluated, spread evenly over the split (default 512)")
    p.add_argument("--target-loss", type=_positive_float("--target-loss"), metavar="L",
                   help="stop, and finish normally, once the held-out loss is at most L")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_train, parser=p)


def _launch_torchrun(n: int) -> int:
    """Re-run this command under torchrun with n processes (one per GPU)."""
    import os
    import subprocess

    import torch

    have = torch.cuda.device_count()
    if have < n:
        raise UserError(f"--gpus {n}: only {have} CUDA GPU(s) visible; use --gpus {max(have, 1)}")
    argv, skip = [], False
    for a in sys.argv[1:]:  # this command's own flags, minus --gpus
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "fastcram", *argv]
    print("fastcram: starting " + " ".join(cmd[2:]), file=sys.stderr)
    return subprocess.call(cmd, env=os.environ.copy())


def cmd_train(args) -> int:
    import os

    import torch

    from .train.loop import train

    if args.gpus > 1 and "RANK" not in os.environ:
        return _launch_torchrun(args.gpus)
    ignored = _ignored_on_resume(args) if args.resume else []
    if ignored:
        print(f"fastcram: --resume continues {args.resume} with its saved configuration; ignored: "
              f"{', '.join(ignored)} (a resumed run takes only {', '.join(RESUME_FLAGS)})", file=sys.stderr)
    gpu = torch.cuda.is_available() and args.device != "cpu"
    name = args.preset or ("crammed-bert" if gpu else "tiny")
    if not args.preset and not args.resume:
        print(f"fastcram: no --preset given: using {name} ({'a GPU is' if gpu else 'no GPU is'} visible)",
              file=sys.stderr)
    tcfg = dataclasses.replace(TrainConfig(), **preset(name).train_overrides)
    hours = args.hours if args.hours is not None else (args.minutes / 60 if args.minutes is not None else 24.0)
    tcfg.budget_s = hours * 3600.0
    if not math.isfinite(tcfg.budget_s):
        flag = f"--hours {args.hours:g}" if args.hours is not None else f"--minutes {args.minutes:g}"
        raise UserError(f"{flag}: a budget that large is infinite in seconds; give a finite budget")
    tcfg.device, tcfg.seed = args.device, args.seed
    tcfg.norm_kernels = args.norm_kernels
    tcfg.compile = gpu if args.compile is None else args.compile
    model_overrides, given = _step_switches(args, tcfg, gpu)
    if args.micro_batch == "auto":
        tcfg.micro_batch_auto, args.micro_batch = True, None
    if args.profile_steps:
        from .observe.profiling import parse_window
        try:
            parse_window(args.profile_steps)
        except ValueError as e:
            raise UserError(str(e)) from None
        tcfg.profile_steps = args.profile_steps
    tcfg.telemetry_interval_s = args.telemetry_interval
    tcfg.deterministic, tcfg.verify_data = args.deterministic, args.verify_data
    tcfg.stop_on_checkpoint_error = args.stop_on_checkpoint_error
    if args.eval_every is not None:
        kind, v = args.eval_every
        tcfg.eval_every_s, tcfg.eval_growth = (v, None) if kind == "every" else (None, v)
    tcfg.target_loss = args.target_loss
    if args.eval_blocks is not None:
        tcfg.eval_blocks = args.eval_blocks
    for flag, field in (("micro_batch", "micro_batch"), ("final_batch", "final_batch"),
                        ("log_interval", "log_interval_s"), ("checkpoint_interval", "checkpoint_interval_s"),
                        ("max_steps", "max_steps"), ("lr", "lr"), ("keep_checkpoints", "keep_checkpoints"),
                        ("max_bad_steps", "max_bad_steps")):
        if getattr(args, flag) is not None:
            setattr(tcfg, field, getattr(args, flag))
    opts = RunOptions(train=tcfg, preset=name, data_dir=args.data, out_dir=args.out, resume=args.resume,
                      trust_checkpoint=args.trust_checkpoint,
                      budget_given=args.hours is not None or args.minutes is not None,
                      progress=not args.quiet, peak_tflops=args.peak_tflops, lr_given=args.lr is not None,
                      flags_given=given + (("micro_batch",) if args.micro_batch else ()),
                      model_overrides=model_overrides)
    return train(opts)["exit_code"]


# what a resumed run takes from the command line; every other flag comes from the run's saved configuration
RESUME_FLAGS = ("--hours/--minutes", "--max-steps", "--lr", "--trust-checkpoint", "--peak-tflops", "--gpus", "--quiet")
_RESUME_DESTS = {"hours", "minutes", "max_steps", "lr", "trust_checkpoint", "peak_tflops", "gpus", "quiet", "resume",
                 "func", "parser", "command"}


def _ignored_on_resume(args) -> list[str]:
    """The flags given with --resume that the saved configuration overrides, as `--flag value`."""
    out = []
    for dest, value in vars(args).items():
        if dest in _RESUME_DESTS or dest == "argv" or value is None or value == args.parser.get_default(dest):
            continue
        flag = "--" + dest.replace("_", "-")
        out.append((flag if value else f"--no-{flag[2:]}") if isinstance(value, bool)
                   else f"{flag} {_as_typed(args, flag, value)}")
    return out


def _as_typed(args, flag: str, value) -> str:
    """A flag's value as the user typed it (a parsed value such as --eval-every's may be a tuple)."""
    words = getattr(args, "argv", [])
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word[len(flag) + 1:]
    return str(value)


def _step_switches(args, tcfg: TrainConfig, gpu: bool) -> tuple[dict, tuple]:
    """The step-level switches from their flags; on a GPU the tunable ones default to auto (the fastest
    measured), on a CPU they stay as they were. Returns (ModelConfig overrides, the switches given)."""
    given = []
    for flag, field, gpu_default in (("kernels", "kernels", "auto"), ("attention", "attention", "auto"),
                                     ("compile_mode", "compile_mode", "auto" if tcfg.compile else "default"),
                                     ("residual_dtype", "residual_dtype", None), ("autocast", "autocast", None)):
        value = getattr(args, flag)
        if value is not None:
            given.append({"residual_dtype": "residual"}.get(flag, flag))
        elif gpu and gpu_default:
            value = gpu_default
        if value is not None:
            setattr(tcfg, field, value)
    if args.compile_mode not in (None, "default") and not tcfg.compile:
        raise UserError(f"--compile-mode {args.compile_mode} needs --compile (the model runs eagerly here)")
    tcfg.retune = args.retune
    if args.compile is not None:
        given.append("compile")
    model_overrides = {}
    if args.sparse_last_layer is not None:
        given.append("sparse")
        model_overrides["sparse_last_layer"] = args.sparse_last_layer == "on"
    return model_overrides, tuple(given)


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_cmd", required=True)
    t = tsub.add_parser("train", help="train a WordPiece tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH", help="text files or folders")
    t.add_argument("--out", required=True, metavar="FILE", help="where to write tokenizer.json")
    t.add_argument("--vocab-size", type=_positive_int("--vocab-size"), default=32768)
    t.set_defaults(func=cmd_tokenizer_train)


def cmd_tokenizer_train(args) -> int:
    from .data.sources import find_text_files, iter_documents
    from .data.tokenizer import SPECIAL_TOKENS, save_tokenizer, train_tokenizer

    if not 16 <= args.vocab_size <= 65535:
        raise UserError(f"--vocab-size {args.vocab_size}: must be between 16 and 65535")
    check_output_file(args.out, "--out", may_exist=False, example="tokenizer.json")
    files = find_text_files(args.input)
    tok = train_tokenizer(iter_documents(files, DataConfig().doc_chars), args.vocab_size)
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise UserError(f"--input {' '.join(args.input)} holds no text to train a tokenizer on; pass files with text")
    save_tokenizer(tok, args.out)
    print(f"wrote {args.out}: vocabulary {tok.get_vocab_size()}", file=sys.stderr)
    if tok.get_vocab_size() < args.vocab_size:
        print(f"fastcram: note: --vocab-size {args.vocab_size} asked for more than this text holds: the vocabulary "
              f"has {tok.get_vocab_size()} tokens; train on more text for a full one", file=sys.stderr)
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    d = dsub.add_parser("prepare", help="tokenise, filter and pack a corpus into shards (in parallel; a rerun "
                                         "of an interrupted prepare resumes it)")
    d.add_argument("--input", nargs="+", required=True, metavar="INPUT",
                   help="files or folders (.txt, .jsonl, optionally .gz/.xz/.zst; .parquet) or Hugging Face datasets "
                        "streamed by id: hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikimedia/wikipedia:20231101.en")
    d.add_argument("--weights", nargs="+", type=_positive_float("--weights"), metavar="W",
                   help="one per --input: its share of the text; the mix ends when the first input runs out "
                        "(default: all of every input)")
    d.add_argument("--out", required=True, metavar="DIR")
    d.add_argument("--tokenizer", metavar="FILE", help="an existing tokenizer.json (default: train one)")
    d.add_argument("--vocab-size", type=_positive_int("--vocab-size"), default=32768)
    d.add_argument("--tokenizer-sample-docs", type=_positive_int("--tokenizer-sample-docs"), metavar="N",
                   help="train the tokenizer on the first N documents only (default: all; use this for big corpora)")
    d.add_argument("--compression-threshold", type=_positive_float("--compression-threshold"), default=0.25,
                   help="drop documents with tokens/characters >= this")
    d.add_argument("--seq-len", type=_positive_int("--seq-len"), default=128)
    d.add_argument("--shard-blocks", type=_positive_int("--shard-blocks"), default=DataConfig().shard_blocks,
                   help="blocks per shard file")
    d.add_argument("--max-documents", type=_positive_int("--max-documents"), metavar="N",
                   help="read at most N documents (counted before the filter)")
    d.add_argument("--max-tokens", type=_positive_int("--max-tokens"), metavar="N",
                   help="stop once N tokens are kept")
    d.add_argument("--order", choices=["shuffle", "curriculum", "stream"], default="shuffle",
                   help="block order: shuffle (seeded, default), curriculum (blocks with the most '.' tokens first, "
                        "ties shuffled), stream (as read)")
    d.add_argument("--holdout-docs", type=_holdout_docs, metavar="N|F",
                   help="held-out split of whole documents, never trained on: N (a whole number) holds out N "
                        "documents, drawn at a rate of 1%% from the start of the stream; F (below 1) that share of "
                        "all documents; 0 none (default: 1%%, at most 1000 documents)")
    d.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    d.add_argument("--text-field", default="text", help="JSONL key / Parquet or dataset column with the text")
    d.add_argument("--workers", type=_positive_int("--workers"), help="tokenising processes (default: all cores)")
    d.add_argument("--quiet", action="store_true", help="no progress lines")
    d.set_defaults(func=cmd_data_prepare)


def _holdout_docs(s: str) -> tuple[str, float]:
    """--holdout-docs: ("count", N) for a whole number >= 1, ("share", F) for 0 <= F < 1."""
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"--holdout-docs needs a number of documents or a share below 1, got {s!r}")
    if v < 1:
        return "share", v
    if v != int(v):
        raise argparse.ArgumentTypeError(f"--holdout-docs {s}: a number of documents must be whole (or give a "
                                         f"share below 1)")
    return "count", int(v)


def cmd_data_prepare(args) -> int:
    from .data.prepare import PrepareOptions, prepare  # not .data.loader: the prepare and its workers need no torch

    if not 16 <= args.vocab_size <= 65535:
        raise UserError(f"--vocab-size {args.vocab_size}: must be between 16 and 65535")
    check_output_dir(args.out, "--out")  # before any input is read
    cfg = DataConfig(vocab_size=args.vocab_size, compression_threshold=args.compression_threshold,
                     seq_len=args.seq_len, shard_blocks=args.shard_blocks)
    opts = PrepareOptions(weights=args.weights, workers=args.workers, max_documents=args.max_documents,
                          max_tokens=args.max_tokens, tokenizer_sample_docs=args.tokenizer_sample_docs,
                          order=args.order, seed=args.seed, text_field=args.text_field)
    if args.holdout_docs is not None:
        kind, v = args.holdout_docs
        if kind == "count":  # N documents at the default rate
            opts.holdout_max_docs = v
        else:  # a share of all documents, no cap
            opts.holdout_rate, opts.holdout_max_docs = v, None
    manifest = prepare(args.input, args.out, cfg, tokenizer_path=args.tokenizer, progress=not args.quiet,
                       options=opts)
    held = (manifest.get("holdout") or {}).get("selected_docs", 0)
    if args.holdout_docs is not None and args.holdout_docs[0] == "count" and held < args.holdout_docs[1]:
        print(f"fastcram: note: --holdout-docs {args.holdout_docs[1]:g} is a cap on the documents drawn at a "
              f"{100 * opts.holdout_rate:g}% rate, and this corpus gave {held}; a share such as --holdout-docs "
              f"0.05 holds out more", file=sys.stderr)
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="a short profiled training session: where each millisecond of a step goes")
    p.add_argument("--preset", choices=list(PRESETS), help="default: crammed-bert with a GPU, tiny without")
    p.add_argument("--steps", type=_positive_int("--steps"), default=5, help="profiled optimizer steps")
    p.add_argument("--warmup", type=_non_negative_int("--warmup"), default=3,
                   help="steps before the window (compilation, caches)")
    p.add_argument("--kernels", choices=["torch", "triton"], default="torch")
    p.add_argument("--micro-batch", type=_positive_int("--micro-batch"))
    p.add_argument("--data", help="prepared data folder (default: the built-in corpus)")
    p.add_argument("--out", help="run folder for the trace (default: a new folder under runs/)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--peak-tflops", type=_positive_float("--peak-tflops"))
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    import torch

    from .train.loop import train

    gpu = torch.cuda.is_available()
    name = args.preset or ("crammed-bert" if gpu else "tiny")
    tcfg = dataclasses.replace(TrainConfig(), **preset(name).train_overrides)
    tcfg.kernels, tcfg.compile = args.kernels, gpu if args.compile is None else args.compile
    tcfg.budget_s = 3600.0  # only sets the schedule's progress; the run stops after the window
    tcfg.final_batch = tcfg.micro_batch = args.micro_batch or tcfg.micro_batch  # one micro-batch per step
    tcfg.profile_steps = f"{args.warmup}:{args.warmup + args.steps}"
    tcfg.max_steps = args.warmup + args.steps
    tcfg.log_interval_s = 1e9
    tcfg.eval_every_s = 0.0  # no held-out evaluation in a profiling session
    opts = RunOptions(train=tcfg, preset=name, data_dir=args.data, out_dir=args.out, peak_tflops=args.peak_tflops)
    summary = train(opts)
    if not summary.get("profile"):
        raise UserError("the profiling window did not complete")
    print(f"trace: {summary['run_dir']}/profile/trace.json", file=sys.stderr)
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="PNG of a run: loss, lr, batch size, tokens/s, MFU, GPU telemetry")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", help="PNG path (default RUN_DIR/run.png)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from .observe.plot import plot_run

    path = plot_run(args.run_dir, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _add_bench(sub) -> None:
    from .benchmarks.cli import add_parser  # flags of `fastcram bench ...` live beside the benchmarks

    add_parser(sub)


def _add_eval(sub) -> None:
    from .glue.finetune import add_parser  # flags of `fastcram eval glue` live beside the evaluation

    add_parser(sub)


def _add_export(sub) -> None:
    from .export.cli import add_parser  # flags of `fastcram export hf` live beside the export

    add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fastcram", description="Train crammed BERT on one GPU in a day, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_tokenizer(sub)
    _add_data(sub)
    _add_profile(sub)
    _add_plot(sub)
    _add_bench(sub)
    _add_eval(sub)
    _add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports torch: Ctrl-C may come here already
        args = parser.parse_args(argv)  # argparse itself exits 2 with one line for malformed flags
        args.argv = list(sys.argv[1:] if argv is None else argv)  # the words as typed, for messages
        return args.func(args)
    except (UserError, WriteError) as e:  # bad input, or an output that cannot be written: one line, exit 2
        print(f"fastcram: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a writer outside fastcram/files.py met a full or read-only disk: still one line
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or not e.filename:
            raise
        print(f"fastcram: error: cannot write {e.filename}: {os_error_text(e)}; free disk space there or choose "
              f"another place", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastcram: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
