"""The tokenizer a trained run's data was made with, found from the run's config: the one place GLUE
fine-tuning and the Hugging Face export look it up, so both accept and refuse the same files."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tokenizers import Tokenizer

from ..errors import UserError
from ..files import inside
from .prepare import MANIFEST, TOKENIZER_FILE
from .tokenizer import SpecialIds, load_tokenizer, special_ids, tokenizer_hash

_FIX = "pass the run's tokenizer with --tokenizer FILE"


@dataclass
class RunTokenizer:
    tokenizer: Tokenizer
    special: SpecialIds
    path: str  # the tokenizer.json read
    manifest_path: str | None  # the data manifest it was checked against; None when there is none
    hash: str  # tokenizer_hash(tokenizer), as data manifests record it


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read data manifest {path} ({e}); {_FIX}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"data manifest {path} is not a JSON object; {_FIX}")
    return manifest


def run_tokenizer(config: dict, vocab_size: int, owner: str, override: str | None = None) -> RunTokenizer:
    """The tokenizer of the run whose config.json is `config` (its data folder's manifest names it; without a
    manifest, the folder's tokenizer.json), or `override`. It must hold vocab_size tokens and, where the data
    manifest records a fingerprint, be the tokenizer the data was made with. `owner` names the run or
    checkpoint in messages. Every problem is one UserError."""
    data_dir = config.get("data_dir") or ""
    manifest_path = os.path.join(data_dir, MANIFEST) if data_dir else None
    manifest_path = manifest_path if manifest_path and os.path.isfile(manifest_path) else None
    manifest = _read_manifest(manifest_path) if manifest_path else {}
    if override:
        path = override
    elif not data_dir:
        raise UserError(f"the run config of {owner} records no data folder; {_FIX}")
    else:
        try:
            path = inside(data_dir, manifest.get("tokenizer", TOKENIZER_FILE))
        except ValueError as e:
            raise UserError(f"{manifest_path} names a tokenizer that is not in {data_dir} ({e}); {_FIX}") from None
    try:
        tok = load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{e}; {_FIX}") from None
    if tok.get_vocab_size() != vocab_size:
        raise UserError(f"{path} has {tok.get_vocab_size()} tokens but the model of {owner} has {vocab_size}; "
                        f"{_FIX}")
    digest = tokenizer_hash(tok)
    if manifest.get("tokenizer_hash") not in (None, digest):
        raise UserError(f"{path} is not the tokenizer the run's data ({manifest_path}) was made with (its "
                        f"fingerprint differs); {_FIX}")
    return RunTokenizer(tok, special_ids(tok, source=path), path, manifest_path, digest)
