"""The run's tokenizer as Hugging Face files: tokenizer.json (fastcram's WordPiece plus the `<cls> A <sep>
[B <sep>]` template of fastcram's GLUE inputs), tokenizer_config.json and special_tokens_map.json.

On ordinary text AutoTokenizer gives fastcram's ids. Text that spells a special token differs on purpose:
fastcram's pretraining data encodes a literal "<mask>" as text, while a transformers tokenizer (fill-mask
input) reads its mask token as the special token, as every transformers tokenizer does.
"""
from __future__ import annotations

import json

from tokenizers import Tokenizer, processors

from ..data.tokenizer import SPECIAL_TOKENS, SpecialIds

SPECIAL_ROLES = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "cls_token": "<cls>", "sep_token": "<sep>", "mask_token": "<mask>"}
assert set(SPECIAL_ROLES.values()) == set(SPECIAL_TOKENS)


def hf_tokenizer_json(tok: Tokenizer, special: SpecialIds) -> str:
    """tokenizer.json: a copy of `tok` that adds `<cls> ... <sep>` like fastcram's GLUE encoding."""
    out = Tokenizer.from_str(tok.to_str())  # a copy: the run's tokenizer object stays as it was
    out.post_processor = processors.TemplateProcessing(
        single="<cls> $A <sep>", pair="<cls> $A <sep> $B:1 <sep>:1",
        special_tokens=[("<cls>", special.cls), ("<sep>", special.sep)])
    out.no_truncation()
    out.no_padding()
    return out.to_str(pretty=True)


def hf_tokenizer_config(max_length: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL_ROLES, "model_max_length": max_length,
            "padding_side": "right", "truncation_side": "right",
            "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: no segment embeddings
            "clean_up_tokenization_spaces": False}


def tokenizer_files(tok: Tokenizer, special: SpecialIds, max_length: int) -> dict[str, bytes]:
    """file name -> content."""
    return {"tokenizer.json": hf_tokenizer_json(tok, special).encode(),
            "tokenizer_config.json": _json(hf_tokenizer_config(max_length)),
            "special_tokens_map.json": _json(SPECIAL_ROLES)}


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()
