"""The auto-tuner's memory in the cache folder (fastcram.data.builtin.cache_dir(), $FASTCRAM_CACHE):

- results: autotune/<hash of the key>.json, the switches a finished tuning chose, keyed by everything that
  can change the answer (GPU name and driver, torch and Triton versions, model config and vocabulary,
  micro-batch, world size, the requested switches, a hash of fastcram/ops' source), so the next run on the
  same machine pays nothing;
- costs: autotune/costs.json, how long one candidate took to measure on this machine and model (coarser key),
  so a short budget knows in advance how many candidates it can afford.
Files are written atomically; an unreadable or mismatched file is a miss, never an error, and a file that
cannot be written (a full disk) is said on stderr and not remembered: the run goes on with its choice.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys

from ..config import ModelConfig, to_dict
from ..data.builtin import cache_dir
from ..files import WriteError, atomic_write_json
from ..observe.env_info import device_name, driver_version, triton_version

FORMAT = 2  # bump when the meaning of a cached result changes (2: measurements replayed at each budget)
OPS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ops")


def folder(root: str | None = None) -> str:
    return os.path.join(root or cache_dir(), "autotune")


def ops_source_hash(ops_dir: str = OPS_DIR) -> str:
    """sha256 over fastcram/ops' Python sources (names and contents): a changed kernel invalidates results."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ops_dir, "*.py"))):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()


def machine(device: str) -> dict:
    import torch

    return {"device": device_name(device), "driver": driver_version(device), "torch": torch.__version__,
            "triton": triton_version()}


def result_key(device: str, model_cfg: ModelConfig, micro_batch: int, world_size: int, requested: dict,
               mask_prob: float, ops_hash: str | None = None) -> dict:
    return {"format": FORMAT, **machine(device), "model": to_dict(model_cfg), "micro_batch": micro_batch,
            "world_size": world_size, "mask_prob": mask_prob, "switches": dict(sorted(requested.items())),
            "ops_source": ops_hash or ops_source_hash()}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def result_path(key: dict, root: str | None = None) -> str:
    return os.path.join(folder(root), f"{_digest(key)}.json")


def load_result(key: dict, root: str | None = None) -> dict | None:
    """The cached result for exactly this key, or None."""
    try:
        with open(result_path(key, root)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("key") == key and "choice" in saved else None


def _write(path: str, obj) -> bool:
    try:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            raise WriteError(os.path.dirname(path), e) from None
        atomic_write_json(path, obj)
    except WriteError as e:
        print(f"fastcram: tuning cache: {e}; the choice is used but not remembered", file=sys.stderr, flush=True)
        return False
    return True


def save_result(key: dict, result: dict, root: str | None = None) -> str | None:
    """The file written, or None when it could not be (said on stderr)."""
    path = result_path(key, root)
    return path if _write(path, {"key": key, **result}) else None


def cost_key(device: str, model_cfg: ModelConfig, micro_batch: int, compiled: bool) -> str:
    return _digest({**machine(device), "model": to_dict(model_cfg), "micro_batch": micro_batch,
                    "compiled": compiled})


def load_cost(key: str, root: str | None = None) -> float | None:
    try:
        with open(os.path.join(folder(root), "costs.json")) as f:
            value = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def save_cost(key: str, seconds: float, root: str | None = None) -> None:
    path = os.path.join(folder(root), "costs.json")
    try:
        with open(path) as f:
            costs = json.load(f)
        costs = costs if isinstance(costs, dict) else {}
    except (OSError, ValueError):
        costs = {}
    costs[key] = round(seconds, 3)
    _write(path, costs)
