"""WordPiece tokenizer on HF tokenizers, as the recipe trains it; special-token ids read from the file."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<cls>", "<sep>", "<mask>")  # <pad> first: id 0


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int
    unk: int
    cls: int
    sep: int
    mask: int

    @property
    def all(self) -> tuple[int, ...]:
        return (self.pad, self.bos, self.eos, self.unk, self.cls, self.sep, self.mask)


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="<unk>", max_input_chars_per_word=100))
    # Whitespace is collapsed by the pre-tokenizer, which splits on any run of whitespace: a regex Replace in
    # the normaliser would give the same ids at about 25% more tokenising time.
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 32768, out_path: str | None = None) -> Tokenizer:
    """Train WordPiece from an iterator of texts (streamed); save atomically to out_path if given."""
    if not 16 <= vocab_size <= 65535:
        raise ValueError(f"vocab size {vocab_size} out of range: need 16..65535 (shards store uint16 ids)")
    tok = _new_tokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    ids = special_ids(tok)
    if ids.pad != 0:  # the trainer adds special tokens first, but never assume it
        raise RuntimeError(f"trained tokenizer puts <pad> at id {ids.pad}, not 0")
    if out_path:
        save_tokenizer(tok, out_path)
    return tok


def save_tokenizer(tok: Tokenizer, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)


def load_tokenizer(path: str) -> Tokenizer:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist; train one with `fastcram tokenizer train`")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exceptions for malformed files
        raise ValueError(f"{path} is not a tokenizers JSON file ({e})") from None
    special_ids(tok, source=path)
    return tok


def special_ids(tok: Tokenizer, source: str = "tokenizer") -> SpecialIds:
    """Ids of the 7 special tokens, looked up in the tokenizer itself."""
    found = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in found.items() if i is None]
    if missing:
        raise ValueError(f"{source} lacks special token(s) {' '.join(missing)}; train it with `fastcram tokenizer train`")
    if found["<pad>"] != 0:
        raise ValueError(f"{source} has <pad> at id {found['<pad>']}; fastcram needs <pad> = 0")
    return SpecialIds(*(found[t] for t in SPECIAL_TOKENS))


def tokenizer_hash(tok: Tokenizer) -> str:
    """A stable fingerprint of the vocabulary, to tie shards to the tokenizer that made them."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256("\n".join(f"{t}\t{i}" for t, i in vocab).encode())
    return h.hexdigest()[:16]


def encode_batch(tok: Tokenizer, texts: list[str]) -> Iterator[list[int]]:
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        yield enc.ids
