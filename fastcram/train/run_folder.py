"""The run folder: created for a new run or reopened for a resume, its saved configuration, and the
checkpoint a resume starts from."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from ..config import DataConfig, RunOptions, TrainConfig, from_dict
from ..errors import UserError
from . import checkpoint as ckpt


def open_run(opts: RunOptions, check_existing: bool = True) -> tuple[str, bool]:
    """The run folder, and whether it is an existing run to resume."""
    if opts.resume:
        run_dir = opts.resume
        if not os.path.isfile(os.path.join(run_dir, "config.json")):
            raise UserError(f"--resume {run_dir}: not a fastcram run folder (no config.json); pass the folder "
                            f"a `fastcram train` run wrote")
        return run_dir, True
    run_dir = opts.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{opts.preset}")
    if check_existing and os.path.isfile(os.path.join(run_dir, "config.json")):
        raise UserError(f"--out {run_dir} already holds a run; use --resume {run_dir} or another --out")
    if check_existing and os.path.isdir(run_dir) and os.listdir(run_dir):  # never write among the user's files
        raise UserError(f"--out {run_dir} is not empty and holds no run; fastcram writes a run only into a new or "
                        f"empty folder: choose another --out")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {run_dir}: cannot create the run folder ({e.strerror})") from None
    return run_dir, False


def restore_options(opts: RunOptions, run_dir: str) -> RunOptions:
    """On resume the saved configuration wins, except a budget or step limit given on the command line."""
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    train = from_dict(TrainConfig, saved["train"])
    if opts.budget_given:
        train.budget_s = opts.train.budget_s
    train.max_steps = opts.train.max_steps or train.max_steps
    if opts.lr_given:
        train.lr = opts.train.lr
    return dataclasses.replace(opts, train=train, preset=saved["preset"], data_dir=saved["data_dir"],
                               data=from_dict(DataConfig, saved["data"]))


def open_checkpoint(run_dir: str, say: Callable[[str], None], trust: bool = False) -> dict:
    """The newest usable checkpoint of a run (checkpoint.load_checkpoint: one that fails its checksum or holds
    more than plain values is named and the next older one tried); exit 2 when none is left."""
    ckpt.cleanup_temp_files(run_dir)
    if not ckpt.candidates(run_dir):
        raise UserError(f"--resume {run_dir}: the run has no checkpoint yet; start it again instead")
    try:
        return ckpt.load_checkpoint(run_dir, trust=trust, say=say)
    except ckpt.CheckpointError as e:
        raise UserError(f"--resume {run_dir}: {e}") from None
