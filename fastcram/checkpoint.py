"""Atomic checkpoints: model, optimizer, data position, budget spent, config and RNG states.

A checkpoint file is written to a temporary name, fsynced and renamed, so any `*.pt` under a run's
checkpoints/ folder is complete. Resume takes the newest one by step.
"""
from __future__ import annotations

import glob
import os
import random
import re

import numpy as np
import torch

CKPT_DIR = "checkpoints"
FINAL = "final.pt"


def rng_state(mask_gen: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "mask": mask_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, mask_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    mask_gen.set_state(state["mask"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str, payload: dict) -> None:
    """Write payload to path atomically (temp file in the same folder, fsync, rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def step_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CKPT_DIR, f"step-{step:08d}.pt")


def list_checkpoints(run_dir: str) -> list[str]:
    """Periodic checkpoints, oldest first."""
    paths = glob.glob(os.path.join(run_dir, CKPT_DIR, "step-*.pt"))
    return sorted(paths, key=lambda p: int(re.search(r"step-(\d+)\.pt$", p).group(1)))


def latest(run_dir: str) -> str | None:
    """The checkpoint to resume from: final.pt if the run finished, else the newest periodic one."""
    final = os.path.join(run_dir, CKPT_DIR, FINAL)
    if os.path.isfile(final):
        return final
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune(run_dir: str, keep: int) -> None:
    """Keep the newest `keep` periodic checkpoints (final.pt is never pruned)."""
    for p in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        os.remove(p)
