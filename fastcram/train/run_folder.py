"""The run folder: created for a new run or reopened for a resume, its saved configuration, the checkpoint a
resume starts from, and the files a run writes there as it goes (run log, telemetry, profiler window)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable

from ..config import PRESETS, DataConfig, ModelConfig, RunOptions, TrainConfig, from_dict, to_dict
from ..errors import UserError
from ..files import WriteError, atomic_write_json, check_output_dir
from ..observe.profiling import ProfileWindow, parse_window
from ..observe.runlog import NullLog, RunLog
from ..observe.telemetry import TelemetrySampler
from . import checkpoint as ckpt
from .distributed import DistContext

CONFIG = "config.json"


def open_run(opts: RunOptions, check_existing: bool = True) -> tuple[str, bool]:
    """The run folder, and whether it is an existing run to resume. Checked before any work starts: a folder
    that cannot be written (read-only, full, a file) is a WriteError naming the flag."""
    if opts.resume:
        run_dir = opts.resume
        if not os.path.isdir(run_dir) or not (os.path.isfile(os.path.join(run_dir, CONFIG)) or
                                              ckpt.candidates(run_dir)):
            raise UserError(f"--resume {run_dir}: not a fastcram run folder (no {CONFIG}, no checkpoint); pass the "
                            f"folder a `fastcram train` run wrote")
        check_output_dir(run_dir, "--resume")
        return run_dir, True
    run_dir = opts.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{opts.preset}")
    if check_existing and os.path.isfile(os.path.join(run_dir, CONFIG)):
        raise UserError(f"--out {run_dir} already holds a run; use --resume {run_dir} or another --out")
    if check_existing and os.path.isdir(run_dir) and os.listdir(run_dir):  # never write among the user's files
        raise UserError(f"--out {run_dir} is not empty and holds no run; fastcram writes a run only into a new or "
                        f"empty folder: choose another --out")
    check_output_dir(run_dir, "--out")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {run_dir}: cannot create the run folder ({e.strerror})") from None
    return run_dir, False


def _read_config(run_dir: str) -> dict:
    """config.json as options; ValueError (or OSError) saying what is wrong with it."""
    with open(os.path.join(run_dir, CONFIG), "rb") as f:
        saved = json.loads(f.read().decode("utf-8"))
    options_from(saved)  # the shape is checked here, not half-way through the start-up
    return saved


# Fields every config.json `fastcram train` has written holds (newer fields may be absent from older runs
# and take their defaults); their absence means the file was damaged or edited.
REQUIRED = {TrainConfig: ("budget_s", "micro_batch", "final_batch", "lr", "seed", "compile"),
            DataConfig: ("seq_len", "mask_prob", "vocab_size")}
# Values that must be positive, or at least not negative, for a run to make sense.
POSITIVE = {"budget_s", "micro_batch", "final_batch", "lr", "eval_blocks", "max_bad_steps", "seq_len",
            "vocab_size", "shard_blocks", "mask_prob"}
NOT_NEGATIVE = {"log_interval_s", "checkpoint_interval_s", "telemetry_interval_s", "keep_checkpoints",
                "eval_every_s", "eval_growth", "max_steps"}
_TYPES = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,), "dict": (dict,),
          "tuple": (list, tuple), "None": (type(None),)}


def _checked_fields(cls, d) -> None:
    """ValueError naming the first field of a saved `cls` section that is missing, of the wrong type, or out of
    range (the types come from the dataclass's annotations, e.g. "float | None")."""
    if not isinstance(d, dict):
        raise ValueError(f"its {cls.__name__} section is not a JSON object")
    missing = [k for k in REQUIRED.get(cls, ()) if k not in d]
    if missing:
        raise ValueError(f"its {cls.__name__} section lacks {', '.join(missing)}")
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        allowed = tuple(t for name in str(f.type).split("|") for t in _TYPES.get(name.strip(), (object,)))
        if (isinstance(v, bool) and bool not in allowed) or not isinstance(v, allowed):
            raise ValueError(f"{f.name} = {v!r} is not a {f.type}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{f.name} = {v!r} is not finite")
        if f.name in POSITIVE and v is not None and not v > 0:
            raise ValueError(f"{f.name} = {v!r} must be positive")
        if f.name in NOT_NEGATIVE and v is not None and v < 0:
            raise ValueError(f"{f.name} = {v!r} must not be negative")


def options_from(saved) -> tuple[TrainConfig, DataConfig, str, str | None]:
    """(train config, data config, preset, data folder) of a saved run config; ValueError when it has not the
    shape and values `fastcram train` writes (a field missing, of the wrong type or out of range, an unknown
    preset)."""
    try:
        _checked_fields(TrainConfig, saved["train"])
        _checked_fields(DataConfig, saved["data"])
        train, data = from_dict(TrainConfig, saved["train"]), from_dict(DataConfig, saved["data"])
        preset, data_dir = saved["preset"], saved["data_dir"]
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not a run config: {type(e).__name__} {e}") from None
    except ValueError as e:
        raise ValueError(f"not a valid run config: {e}") from None
    if not isinstance(preset, str) or not (data_dir is None or isinstance(data_dir, str)):
        raise ValueError("not a run config: preset or data_dir of the wrong type")
    if preset not in PRESETS:
        raise ValueError(f"not a valid run config: preset {preset!r} is not one of {', '.join(PRESETS)}")
    return train, data, preset, data_dir


def saved_config(run_dir: str, resumed: dict | None, say: Callable[[str], None]) -> dict:
    """The run's saved configuration: config.json, or, when that is unreadable or damaged, the copy in the
    checkpoint being resumed (said, and config.json written again from it)."""
    path = os.path.join(run_dir, CONFIG)
    try:
        return _read_config(run_dir)
    except (OSError, ValueError) as e:  # ValueError: JSON, UTF-8 or shape
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
    if resumed is None:
        raise UserError(f"--resume {run_dir}: {path} is unreadable or not valid ({why}) and the run has no "
                        f"checkpoint that holds a copy; start a new run with another --out") from None
    try:
        options_from(resumed["config"])
    except ValueError as e:
        raise UserError(f"--resume {run_dir}: {path} is unreadable or not valid ({why}) and the copy in "
                        f"{resumed['_path']} is not valid either ({e}); start a new run with another --out") from None
    say(f"fastcram: warning: {path} is unreadable or not valid ({why}); using the copy of the configuration "
        f"stored in {resumed['_path']}")
    try:
        atomic_write_json(path, resumed["config"])
        say(f"fastcram: wrote {path} again from that copy")
    except WriteError as e:
        say(f"fastcram: warning: {e}")
    return resumed["config"]


def restore_options(opts: RunOptions, saved: dict) -> RunOptions:
    """On resume the saved configuration wins, except a budget or step limit given on the command line."""
    train, data, preset, data_dir = options_from(saved)
    if opts.budget_given:
        train.budget_s = opts.train.budget_s
    train.max_steps = opts.train.max_steps or train.max_steps
    if opts.lr_given:
        train.lr = opts.train.lr
    return dataclasses.replace(opts, train=train, preset=preset, data_dir=data_dir, data=data)


def open_checkpoint(run_dir: str, say: Callable[[str], None], trust: bool = False) -> dict | None:
    """The newest usable checkpoint of a run (checkpoint.load_checkpoint: one that fails its checksum, holds
    more than plain values, lacks what a resume needs or holds non-finite weights is named and the next older
    one tried); None when the run has no checkpoint at all; exit 2 when none of them can be used."""
    ckpt.cleanup_temp_files(run_dir)
    if not ckpt.candidates(run_dir):
        return None
    try:
        return ckpt.load_checkpoint(run_dir, trust=trust, say=say, require=ckpt.TRAINING_KEYS)
    except ckpt.CheckpointError as e:
        raise UserError(f"--resume {run_dir}: {e}") from None


def open_run_folder(opts: RunOptions, main: bool, say: Callable[[str], None]) -> tuple[str, dict | None, RunOptions]:
    """(run folder, the checkpoint a resume starts from, the run's options): a new run's folder, or a resumed
    run's, whose saved configuration (config.json, or the checkpoint's copy of it when config.json is damaged)
    wins over the command line (restore_options). The checkpoint is None for a new run and for a resumed run
    that stopped before its first one."""
    run_dir, resuming = open_run(opts, check_existing=main)
    if not resuming:
        return run_dir, None, opts
    resumed = open_checkpoint(run_dir, say, opts.trust_checkpoint)
    opts = restore_options(opts, saved_config(run_dir, resumed, say))
    if resumed is None:
        say(f"fastcram: {run_dir} has no checkpoint yet (it stopped before its first one): starting it again from "
            f"step 0 with its saved configuration")
    return run_dir, resumed, opts


def run_config(opts: RunOptions, data_dir: str, model_cfg: ModelConfig, world_size: int) -> dict:
    """The configuration config.json and every checkpoint hold (what saved_config and restore_options read)."""
    return {"preset": opts.preset, "data_dir": os.path.abspath(data_dir), "model": to_dict(model_cfg),
            "train": to_dict(opts.train), "data": to_dict(opts.data), "world_size": world_size}


def write_config(run_dir: str, config: dict) -> None:
    atomic_write_json(os.path.join(run_dir, CONFIG), config)


def open_log(run_dir: str, main: bool, warn: Callable[[str], None]) -> RunLog | NullLog:
    """The run log, log.jsonl (rank 0 writes it)."""
    return RunLog(os.path.join(run_dir, "log.jsonl"), warn=warn) if main else NullLog()


def open_watchers(run_dir: str, tcfg: TrainConfig, ctx: DistContext, device: str,
                  quiet: bool) -> tuple[ProfileWindow | None, TelemetrySampler]:
    """The profiler window of --profile-steps (rank 0) and the telemetry sampler, started (every rank samples
    its own GPU into its own file)."""
    profiler = None
    if tcfg.profile_steps and ctx.is_main:
        a, b = parse_window(tcfg.profile_steps)
        profiler = ProfileWindow(os.path.join(run_dir, "profile"), a, b, device)
    tel_name = "telemetry.jsonl" if not ctx.enabled else f"telemetry-rank{ctx.rank}.jsonl"
    telemetry = TelemetrySampler(os.path.join(run_dir, tel_name), tcfg.telemetry_interval_s,
                                 device_index=ctx.local_rank if device.startswith("cuda") else 0, quiet=quiet).start()
    return profiler, telemetry
