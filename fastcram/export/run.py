"""What an export reads from a `fastcram train` run folder: the model config, one checkpoint's weights, the
tokenizer of the run's data, and the provenance (run, checkpoint, data manifest and tokenizer hashes)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .. import __version__
from ..config import ModelConfig, from_dict
from ..data.prepare import MANIFEST, TOKENIZER_FILE
from ..data.tokenizer import SpecialIds, load_tokenizer, special_ids, tokenizer_hash
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


def _tokenizer_paths(config: dict, override: str | None, run_dir: str) -> tuple[str, str | None]:
    """(tokenizer file, data manifest or None)."""
    data_dir = config.get("data_dir") or ""
    manifest = os.path.join(data_dir, MANIFEST)
    manifest = manifest if data_dir and os.path.isfile(manifest) else None
    if override:
        return override, manifest
    if manifest is None:
        raise UserError(f"the data folder of {run_dir} ({data_dir or 'not recorded'}) has no {MANIFEST}; pass "
                        f"the run's tokenizer with --tokenizer FILE")
    name = _read_json(manifest, "data manifest").get("tokenizer", TOKENIZER_FILE)
    return os.path.join(data_dir, name), manifest


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
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UserError(f"--checkpoint {checkpoint} does not exist")
    payload = checkpoint_payload(checkpoint or run_dir, trust)
    checkpoint = payload["_path"]
    state = model_state(payload, checkpoint)

    tok_path, manifest_path = _tokenizer_paths(config, tokenizer, run_dir)
    try:
        tok = load_tokenizer(tok_path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{e}; pass the run's tokenizer with --tokenizer FILE") from None
    if tok.get_vocab_size() != cfg.vocab_size:
        raise UserError(f"{tok_path} has {tok.get_vocab_size()} tokens but the model of {run_dir} has "
                        f"{cfg.vocab_size}; pass the run's tokenizer with --tokenizer FILE")
    tok_hash = tokenizer_hash(tok)
    manifest = _read_json(manifest_path, "data manifest") if manifest_path else {}
    if manifest.get("tokenizer_hash") not in (None, tok_hash):
        raise UserError(f"{tok_path} is not the tokenizer the run's data ({manifest_path}) was made with (hash "
                        f"differs); pass the run's tokenizer with --tokenizer FILE")
    provenance = {
        "fastcram_version": __version__,
        "run": os.path.basename(os.path.normpath(run_dir)),
        "preset": config.get("preset"),
        "checkpoint": os.path.basename(checkpoint),
        "step": payload.get("step"),
        "kernels": config.get("train", {}).get("kernels"),
        "data_manifest_sha256": sha256_file(manifest_path) if manifest_path else None,
        "tokenizer_hash": tok_hash,  # fastcram's vocabulary fingerprint, as the data manifest records it
        "tokenizer_sha256": sha256_file(tok_path),
    }
    return RunExport(cfg, state, tok, special_ids(tok, source=tok_path), provenance)
