"""What an export reads from a `fastcram train` run folder: the model config, one checkpoint's weights, the
tokenizer of the run's data, and the provenance (run, checkpoint, data manifest and tokenizer hashes)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .. import __version__
from ..config import ModelConfig, from_dict
from ..data.run_tokenizer import run_tokenizer
from ..data.tokenizer import SpecialIds
from ..errors import UserError
from ..files import sha256_file
from ..train import checkpoint as ckpt

COMPILED_PREFIX = "_orig_mod"  # torch.compile's wrapper puts this component into every state_dict key


@dataclass
class RunExport:
    cfg: ModelConfig
    state: dict[str, torch.Tensor]  # the model's state_dict, keys as CrammedBert names them
    tokenizer: object  # tokenizers.Tokenizer
    special: SpecialIds
    provenance: dict  # recorded in the exported config


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {path} ({e})") from None


def checkpoint_payload(path: str, trust: bool = False) -> dict:
    """The one place an export reads a checkpoint: the train layer's loader, which verifies it first. A run
    folder gives its newest usable checkpoint (failing ones are named); one file is used or refused (exit 2)."""
    return ckpt.load_checkpoint(path, trust=trust)


def model_state(payload: dict, path: str) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint payload, with torch.compile's `_orig_mod.` components removed."""
    state = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds no model weights (no 'model' entry); pass a checkpoint "
                        f"`fastcram train` wrote")
    clean = {}
    for key, value in state.items():
        name = ".".join(p for p in key.split(".") if p != COMPILED_PREFIX)
        if name in clean:
            raise UserError(f"checkpoint {path} holds {name} twice (with and without {COMPILED_PREFIX}.)")
        clean[name] = value
    return clean


def read_run(run_dir: str, checkpoint: str | None = None, tokenizer: str | None = None,
             trust: bool = False) -> RunExport:
    """Config, weights, tokenizer and provenance of a run folder; every problem is one UserError."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{run_dir} is not a fastcram run folder (no config.json); pass a folder `fastcram train` "
                        f"wrote")
    config = _read_json(config_path, "run config")
    try:
        cfg = from_dict(ModelConfig, config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{config_path} is not a valid run config ({e})") from None
    if checkpoint is not None and os.path.isdir(checkpoint):
        raise UserError(f"--checkpoint {checkpoint} is a folder; give one checkpoint file (e.g. "
                        f"{os.path.join(checkpoint, 'final.pt')}), or the run folder alone for its newest usable one")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UserError(f"--checkpoint {checkpoint} does not exist")
    payload = checkpoint_payload(checkpoint or run_dir, trust)
    checkpoint = payload["_path"]
    state = model_state(payload, checkpoint)

    found = run_tokenizer(config, cfg.vocab_size, run_dir, tokenizer)
    provenance = {
        "fastcram_version": __version__,
        "run": os.path.basename(os.path.normpath(run_dir)),
        "preset": config.get("preset"),
        "checkpoint": os.path.basename(checkpoint),
        "step": payload.get("step"),
        "kernels": config.get("train", {}).get("kernels"),
        "data_manifest_sha256": sha256_file(found.manifest_path) if found.manifest_path else None,
        "tokenizer_hash": found.hash,  # fastcram's vocabulary fingerprint, as the data manifest records it
        "tokenizer_sha256": sha256_file(found.path),
    }
    return RunExport(cfg, state, found.tokenizer, found.special, provenance)
