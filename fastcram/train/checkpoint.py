"""Checkpoints: the one format (version 2), its atomic writes and the one loader that resume, eval and export use.

A checkpoint is a plain `torch.save` file (model, optimizer, step, data position, budget spent, config, RNG
states) holding only tensors and plain values (dict, list, tuple, str, int, float, bool, None), so
`torch.load(weights_only=True)` reads it and no code can run while it is read. Beside it, NAME.pt.sha256.json
records its format, step, size and SHA-256; the loader checks size and checksum before anything is unpickled.

Writes are atomic: the payload goes to a temp file (hashed as it is written), is fsynced, its record is written
atomically, then the payload is renamed into place. A write killed at any moment leaves either no NAME.pt or a
complete one; a NAME.pt whose record is older (an overwritten final.pt, killed between the two renames) fails
its checksum and is passed over like a damaged file. Temp files and records without their checkpoint are
removed when a run resumes. A write that fails (a full disk) is a WriteError naming the file and the cause
(ENOSPC) and leaves nothing behind. A state whose weights are not finite is never written: it would replace
the last finite checkpoint. Pruning keeps the newest checkpoints that verify against their records; one that
fails its checksum is not counted, so the newest good checkpoint is never pruned.

Version-1 checkpoints (written before this format: no record, numpy RNG state as an array) need full
unpickling, which can run code: they are refused unless the user vouches for the file (--trust-checkpoint).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..data.loader import DataPosition
from .. import files
from ..errors import UserError
from ..files import WriteError, as_write_error, atomic_write_json, fsync_folder, sha256_stream

FORMAT = 2
CKPT_DIR = "checkpoints"
FINAL = "final.pt"
RECORD_SUFFIX = ".sha256.json"  # NAME.pt -> NAME.pt.sha256.json
TRUST_FLAG = "--trust-checkpoint"
_STEP_NAME = re.compile(r"step-(\d+)\.pt")
_TEMP_NAME = re.compile(r"(?:step-\d+|final)\.pt(?:\.sha256\.json)?\.tmp\d+")  # what a killed write leaves
# what `fastcram train --resume` needs from a checkpoint (eval and export need only the model)
TRAINING_KEYS = ("model", "optimizer", "step", "micro_steps", "sequences", "position", "elapsed_s", "config", "rng",
                 "ops")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and why."""


# ---------------------------------------------------------------- RNG states as tensors and plain values

def rng_state(mask_gen: torch.Generator) -> dict:
    version, keys, gauss_next = random.getstate()
    kind, mt, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(keys), gauss_next],
             "numpy": {"kind": kind, "keys": torch.from_numpy(mt.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state(), "mask": mask_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, mask_gen: torch.Generator) -> None:
    """Restore rng_state(); also takes a trusted version-1 state (tuples and a numpy array)."""
    version, keys, gauss_next = state["python"]
    random.setstate((version, tuple(keys), gauss_next))
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np_state = (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                    np_state["has_gauss"], np_state["cached_gaussian"])
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    mask_gen.set_state(state["mask"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- writing

class _HashingWriter:
    """A write-only file that hashes what passes through. It has no seek: a serialiser that needed one would
    fail loudly rather than leave a checksum of other bytes. torch.save turns a failing write into a
    RuntimeError without its errno, so the OSError is kept here for the message."""

    def __init__(self, f):
        self.f, self.name, self.sha, self.size = f, f.name, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        try:
            files.write_all(self.f, data)
        except OSError as e:
            self.error = e
            raise
        return len(data)

    def flush(self) -> None:
        self.f.flush()


def record_path(path: str) -> str:
    return path + RECORD_SUFFIX


def save(path: str, payload: dict) -> dict:
    """Write payload (plus its format number) to path atomically, with its record beside it; returns the record.
    WriteError (naming the file and the cause, e.g. ENOSPC) when it cannot be written; nothing is left then."""
    tmp, out, written = f"{path}.tmp{os.getpid()}", None, False
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            out = _HashingWriter(f)
            torch.save({**payload, "format": FORMAT}, out)
            f.flush()
            os.fsync(f.fileno())
        record = {"format": FORMAT, "file": os.path.basename(path), "step": payload.get("step"), "bytes": out.size,
                  "sha256": out.sha.hexdigest()}
        atomic_write_json(record_path(path), record)
        os.replace(tmp, path)
        written = True
        fsync_folder(os.path.dirname(path))  # make the renames themselves durable
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not written and not os.path.exists(path):  # a record without its checkpoint would be stale
            with contextlib.suppress(OSError):
                os.remove(record_path(path))
        if isinstance(e, OSError):
            raise as_write_error(path, e) from None
        if isinstance(e, RuntimeError) and out is not None and out.error is not None:
            raise WriteError(path, out.error) from None
        raise
    return record


def nonfinite(payload: dict) -> str | None:
    """The name of the first model weight or optimizer state that holds NaN or inf, or None when all are finite.
    Runs on the host copy, on the writer's thread."""
    def tensors(prefix, obj):
        if isinstance(obj, torch.Tensor):
            yield prefix, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(f"{prefix}.{i}", v)

    for part in ("model", "optimizer"):
        for name, t in tensors(part, payload.get(part)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return name
    return None


# ---------------------------------------------------------------- the one loader

def load_checkpoint(path: str, trust: bool = False, say: Callable[[str], None] | None = None,
                    require: tuple[str, ...] = ("model",)) -> dict:
    """The payload of a checkpoint, checked; `path` is a checkpoint file or a run folder. The payload's "_path"
    says which file it came from.

    A file: its record (path + .sha256.json) must give its size and SHA-256 before anything is unpickled, then
    torch.load(weights_only=True) reads it (tensors and plain values only) and it must be format 2; otherwise
    CheckpointError (a UserError: exit 2) names the file and what failed. A run folder: its checkpoints newest
    first (by the step their records give; final.pt first on a tie); each that fails is named through `say`
    (default: stderr) and the next older one tried; CheckpointError when none is left.

    The payload must hold the `require`d entries (a dict of tensors under "model") and finite weights; a
    checkpoint that lacks them, or holds NaN or inf, fails like a damaged one.

    trust=True (--trust-checkpoint): a file without a record, or holding more than plain values (a version-1
    checkpoint), is read by full unpickling, which can run code: only for files the user vouches for. A wrong
    size or checksum is refused even then."""
    if not os.path.isdir(path):
        return _load_file(path, trust, require)
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    paths = candidates(path)
    if not paths:
        raise CheckpointError(f"{path} has no checkpoint ({CKPT_DIR}/final.pt or step-*.pt)")
    if len(paths) == 1:
        return _load_file(paths[0], trust, require)
    for i, p in enumerate(paths):
        try:
            payload = _load_file(p, trust, require)
        except CheckpointError as e:
            say(f"fastcram: warning: {e}; trying an older checkpoint")
            continue
        for q in _unchecked_newer(paths[i + 1:], payload.get("step")):
            say(f"fastcram: warning: {q} was not used: its checksum record is missing or unreadable, so it cannot "
                f"be checked, and it may be newer than {p}; restore its record, or, if you made it yourself, "
                f"give that file with {TRUST_FLAG}")
        return payload
    raise CheckpointError(f"none of the {len(paths)} checkpoints of {path} can be used (each is named above)")


def _unchecked_newer(rest: list[str], step) -> list[str]:
    """Of the checkpoints ranked after the one loaded, those without a usable record (ranked last for that, not
    for their age) that may be newer than it: final.pt, or a step-N.pt with N above its step."""
    out = []
    for q in rest:
        try:
            if read_record(q) is not None:
                continue
        except CheckpointError:
            pass
        m = _STEP_NAME.fullmatch(os.path.basename(q))
        if os.path.basename(q) == FINAL or not isinstance(step, int) or (m and int(m.group(1)) > step):
            out.append(q)
    return out


def _load_file(path: str, trust: bool, require: tuple[str, ...] = ("model",)) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    record = read_record(path)
    if record is None and not trust:
        raise CheckpointError(f"checkpoint {path} has no checksum record ({os.path.basename(record_path(path))}): "
                              f"it is a version-1 checkpoint or lost its record, and reading it would unpickle "
                              f"arbitrary objects, which can run code; if you made it yourself, pass {TRUST_FLAG}")
    with open(path, "rb") as f:  # one open file: what is hashed is what is loaded
        if record is not None:
            size = os.fstat(f.fileno()).st_size
            sha = sha256_stream(f) if size == record["bytes"] else None
            if sha != record["sha256"]:
                raise CheckpointError(f"checkpoint {path} fails its checksum ({'size' if sha is None else 'SHA-256'} "
                                      f"differs from {os.path.basename(record_path(path))}): the file is damaged "
                                      f"or was changed")
            f.seek(0)
        try:
            payload = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # an UnpicklingError names the first object that is not a plain value
            if not trust:
                raise CheckpointError(f"checkpoint {path} holds more than tensors and plain values, so it is not read "
                                      f"({type(e).__name__}: {_first_line(e)}); if you made it yourself, pass "
                                      f"{TRUST_FLAG}") from None
            f.seek(0)
            try:
                payload = torch.load(f, map_location="cpu", weights_only=False)
            except Exception as e2:
                raise CheckpointError(f"checkpoint {path} cannot be read ({type(e2).__name__}: "
                                      f"{_first_line(e2)})") from None
    if not isinstance(payload, dict) or not (payload.get("format") == FORMAT or trust):
        what = payload.get("format", 1) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path} is format {what}; this fastcram reads format {FORMAT}")
    missing = [k for k in require if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(repr(k) for k in missing)}: it is not a "
                              f"checkpoint `fastcram train` wrote (or not a whole one)")
    model = payload.get("model")
    if "model" in require and not (isinstance(model, dict) and model
                                   and all(isinstance(v, torch.Tensor) for v in model.values())):
        raise CheckpointError(f"checkpoint {path} holds no model weights (its 'model' is not a state_dict of "
                              f"tensors): it is not a checkpoint `fastcram train` wrote")
    bad = nonfinite({"model": model}) if "model" in require else None
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights (NaN or inf in {bad}): it was written "
                              f"after training diverged or the file was changed")
    payload["_path"] = path
    return payload


def _first_line(e: Exception) -> str:
    """The lines of an error that name the problem: for torch's weights-only refusal the object the file asked
    to load (its first lines are general advice), for load_state_dict the keys that differ; else the first
    line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [""]
    named = [ln for ln in lines if ("unsupported" in ln.lower() and not ln.startswith("Weights only load failed"))
             or ln.startswith(("Missing key(s)", "Unexpected key(s)", "size mismatch"))]  # load_state_dict's
    return "; ".join(named or lines[:1])[:300]


def read_record(path: str) -> dict | None:
    """The record beside a checkpoint file, or None when there is none; CheckpointError when it is malformed."""
    rec = record_path(path)
    try:
        with open(rec) as f:
            record = json.load(f)
        if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
                and re.fullmatch(r"[0-9a-f]{64}", str(record.get("sha256")))):
            raise ValueError("no size and SHA-256 in it")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its record {rec} is unreadable ({e})") from None
    return record


# ---------------------------------------------------------------- a run's checkpoint files

def step_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CKPT_DIR, f"step-{step:08d}.pt")


def list_checkpoints(run_dir: str) -> list[str]:
    """Periodic checkpoints, oldest first."""
    folder = os.path.join(run_dir, CKPT_DIR)
    names = [n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if _STEP_NAME.fullmatch(n)]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(_STEP_NAME.fullmatch(n).group(1)))]


def candidates(run_dir: str) -> list[str]:
    """A run's checkpoint files, newest first: by the step in their records (final.pt first on a tie), then those
    without a record (version 1: final.pt, then periodic ones by the step in their names)."""
    final = os.path.join(run_dir, CKPT_DIR, FINAL)
    paths = ([final] if os.path.isfile(final) else []) + list_checkpoints(run_dir)[::-1]
    steps = {}
    for p in paths:
        try:
            rec = read_record(p)
        except CheckpointError:
            rec = None  # named when it is loaded
        steps[p] = rec.get("step") if rec is not None and isinstance(rec.get("step"), int) else None
    with_step = sorted((p for p in paths if steps[p] is not None), key=lambda p: (-steps[p], p != final))
    return with_step + [p for p in paths if steps[p] is None]


def latest(run_dir: str) -> str | None:
    c = candidates(run_dir)
    return c[0] if c else None


def _remove_checkpoint(path: str) -> None:
    os.remove(path)
    if os.path.exists(record_path(path)):
        os.remove(record_path(path))


class Verified:
    """Which checkpoint files match their records (size and SHA-256), remembered by inode, size and change time,
    so a file is hashed once and again only when something changed it."""

    def __init__(self):
        self._known: dict[str, tuple] = {}

    @staticmethod
    def _key(path: str) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def remember(self, path: str) -> None:
        """path was just written and hashed as it was written."""
        self._known[path] = self._key(path)

    def ok(self, path: str) -> bool:
        key = self._key(path)
        if key is None:
            return False
        if self._known.get(path) == key:
            return True
        try:
            record = read_record(path)
            if record is None or record["bytes"] != key[1]:
                return False
            with open(path, "rb") as f:
                good = sha256_stream(f) == record["sha256"]
        except (CheckpointError, OSError):
            return False
        if good:
            self._known[path] = key
        return good


def prune(run_dir: str, keep: int, verified: Verified | None = None) -> list[str]:
    """Keep the newest `keep` (at least 1) periodic checkpoints that verify against their records and remove the
    periodic ones older than those; returns the removed paths. A checkpoint that fails its checksum is not
    counted, so the newest good one is never removed because damaged ones are newer. final.pt is never pruned."""
    verified = verified or Verified()
    good, removed = 0, []
    for path in reversed(list_checkpoints(run_dir)):
        if good >= max(keep, 1):
            _remove_checkpoint(path)
            removed.append(path)
        elif verified.ok(path):
            good += 1
    return removed


def cleanup_temp_files(run_dir: str) -> list[str]:
    """Remove what killed writes left: temp files, and records whose checkpoint never appeared (only names
    fastcram gives its own files)."""
    folder = os.path.join(run_dir, CKPT_DIR)
    stale = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        ckpt = name[:-len(RECORD_SUFFIX)] if name.endswith(RECORD_SUFFIX) else None
        if _TEMP_NAME.fullmatch(name) or (ckpt and (ckpt == FINAL or _STEP_NAME.fullmatch(ckpt))
                                           and not os.path.exists(os.path.join(folder, ckpt))):
            with contextlib.suppress(FileNotFoundError):  # every rank of a resumed run cleans up
                os.remove(path)
            stale.append(path)
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
    an unwritable folder) are reported through `results()`, never raised into the training loop; every write is
    atomic, so the checkpoints already written stay intact. A state whose weights are not finite is not written
    (its record says "nonfinite"). After a write, older periodic checkpoints are pruned (prune: only verified
    ones count).
    """

    def __init__(self, run_dir: str, keep: int):
        import threading

        self.run_dir, self.keep = run_dir, keep
        self.verified = Verified()
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
            rec = {"event": "checkpoint", "step": step, "path": path, "copy_s": round(copy_s, 4),
                   "budget_spent_s": host.get("elapsed_s")}
            try:
                bad = nonfinite(host)
                if bad:
                    rec.update(nonfinite=True, error=f"not written: the weights are not finite (NaN or inf in {bad}), "
                                                     f"and it would replace the last finite checkpoint")
                else:
                    save(path, host)
                    self.verified.remember(path)
                    rec["write_s"] = round(time.perf_counter() - t1, 4)
            except Exception as e:  # reported, not raised: training goes on
                rec["error"] = str(e) if isinstance(e, WriteError) else f"{e.__class__.__name__}: {e}"
            if "write_s" in rec and os.path.basename(path) != FINAL:
                try:
                    rec["pruned"] = [os.path.basename(p) for p in prune(self.run_dir, self.keep, self.verified)]
                except OSError as e:  # the new checkpoint is written all the same
                    rec["prune_error"] = f"{e.__class__.__name__}: {e}"
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


# ---------------------------------------------------------------- room for checkpoints

def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About the size of one checkpoint of this model: its weights and AdamW's two moments (fp32, as the
    parameters), plus 1 MiB for the counters, RNG states and the config."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * weights + (1 << 20)


def check_room(run_dir: str, model: torch.nn.Module, keep: int, unsaved_limit: float,
               say: Callable[[str], None]) -> None:
    """Before training: says when the run folder's disk has no room for one checkpoint (the run would go on and
    stop at the unsaved-budget limit having saved nothing: space may still be freed meanwhile), or for the
    checkpoints kept at once (--keep-checkpoints, final.pt and the one being written)."""
    one = checkpoint_bytes(model)
    folder = os.path.join(run_dir, CKPT_DIR) if os.path.isdir(os.path.join(run_dir, CKPT_DIR)) else run_dir
    free = files.free_bytes(folder)
    if free is None:
        return
    want = one * (max(keep, 1) + 2)
    if free < one:
        say(f"fastcram: warning: {folder} has {free / 2**20:.1f} MiB free but one checkpoint of this model needs "
            f"about {one / 2**20:.1f} MiB: unless space is freed, the run saves nothing and stops once "
            f"{100 * unsaved_limit:g}% of the budget is unsaved; free space there or stop it and choose another "
            f"--out")
    elif free < want:
        say(f"fastcram: warning: {folder} has {free / 2**20:.1f} MiB free; keeping {keep} checkpoint(s), final.pt "
            f"and the one being written takes about {want / 2**20:.1f} MiB: free space there or lower "
            f"--keep-checkpoints")


# ---------------------------------------------------------------- restoring a run

@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken
    micro_steps: int = 0
    sequences: int = 0
    position: DataPosition = field(default_factory=DataPosition)


def restore_state(saved: dict, model, optimizer, mask_gen: torch.Generator) -> LoopState:
    """Load a checkpoint's model, optimizer and RNG states; return the loop counters and data position. A
    checkpoint whose entries do not fit this run is a CheckpointError naming it."""
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"], mask_gen)
        return LoopState(int(saved["step"]), int(saved["micro_steps"]), int(saved["sequences"]),
                         DataPosition(**saved["position"]))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"checkpoint {saved.get('_path')} does not fit this run ({type(e).__name__}: "
                              f"{_first_line(e)}); resume from another checkpoint or start a new run") from None
