"""Atomic checkpoints: model, optimizer, data position, budget spent, config and RNG states.

A checkpoint file is written to a temporary name, fsynced and renamed, so any `*.pt` under a run's
checkpoints/ folder is complete. Resume takes the newest one by step.
"""
from __future__ import annotations

import glob
import os
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.loader import DataPosition

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


def candidates(run_dir: str) -> list[str]:
    """Checkpoints to resume from, best first: final.pt if the run finished, then periodic ones newest first."""
    final = os.path.join(run_dir, CKPT_DIR, FINAL)
    return ([final] if os.path.isfile(final) else []) + list_checkpoints(run_dir)[::-1]


def latest(run_dir: str) -> str | None:
    c = candidates(run_dir)
    return c[0] if c else None


def prune(run_dir: str, keep: int) -> None:
    """Keep the newest `keep` periodic checkpoints (final.pt is never pruned)."""
    for p in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        os.remove(p)


def cleanup_temp_files(run_dir: str) -> list[str]:
    """Remove temp files left by a write that was killed (they never look like checkpoints)."""
    stale = glob.glob(os.path.join(run_dir, CKPT_DIR, "*.tmp*"))
    for p in stale:
        os.remove(p)
    return stale


def to_host(obj):
    """A copy of a (nested) state with every tensor on the host, so training can go on while it is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class AsyncCheckpointer:
    """Writes checkpoints on a background thread; training waits only for the copy to host memory.

    One write is in flight at a time (a new request first waits for the previous one). Failures (a full disk,
    an unwritable folder) are reported through `results()`, never raised into the training loop; the previous
    checkpoint stays intact because every write is atomic.
    """

    def __init__(self, run_dir: str, keep: int):
        import threading

        self.run_dir, self.keep = run_dir, keep
        self._threading = threading
        self._thread = None
        self._done: list[dict] = []
        self._lock = threading.Lock()

    def submit(self, path: str, state: dict, step: int) -> float:
        """Copy `state` to host and start writing it; returns the copy time in seconds."""
        import time

        self.wait()
        t0 = time.perf_counter()
        host = to_host(state)
        copy_s = time.perf_counter() - t0

        def write():
            t1 = time.perf_counter()
            rec = {"event": "checkpoint", "step": step, "path": path, "copy_s": round(copy_s, 4)}
            try:
                save(path, host)
                if os.path.basename(path) != FINAL:
                    prune(self.run_dir, self.keep)
                rec["write_s"] = round(time.perf_counter() - t1, 4)
            except Exception as e:  # reported, not raised: training goes on
                rec["error"] = f"{e.__class__.__name__}: {e}"
            with self._lock:
                self._done.append(rec)

        self._thread = self._threading.Thread(target=write, name="fastcram-checkpoint", daemon=False)
        self._thread.start()
        return copy_s

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def results(self) -> list[dict]:
        """Finished writes since the last call (each with write_s, or error)."""
        with self._lock:
            done, self._done = self._done, []
        return done


# ---------------------------------------------------------------- restoring a run

@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken
    micro_steps: int = 0
    sequences: int = 0
    position: DataPosition = field(default_factory=DataPosition)


def restore_state(saved: dict, model, optimizer, mask_gen: torch.Generator) -> LoopState:
    """Load a checkpoint's model, optimizer and RNG states; return the loop counters and data position."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"], mask_gen)
    return LoopState(saved["step"], saved["micro_steps"], saved["sequences"], DataPosition(**saved["position"]))
