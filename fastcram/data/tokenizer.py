"""The recipe's WordPiece tokenizer: trained deterministically by fastcram (wordpiece.py), stored and run as an HF
tokenizers JSON file; special-token ids read from the file; fast encoding of many documents."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..files import atomic_write_bytes
from .wordpiece import learn_vocabulary

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


def _new_tokenizer(vocab: dict[str, int] | None = None) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab or {}, unk_token="<unk>", max_input_chars_per_word=100))
    # Whitespace is collapsed by the pre-tokenizer, which splits on any run of whitespace: a regex Replace in
    # the normaliser would give the same ids at about 25% more tokenising time.
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 32768, out_path: str | None = None) -> Tokenizer:
    """Train WordPiece from an iterator of texts (streamed); save atomically to out_path if given.

    Deterministic: the same texts, in any order, give the same tokenizer (the same JSON bytes with one version
    of the tokenizers library, which writes the file). The vocabulary is the one the tokenizers library's own
    WordPieceTrainer (min_frequency 2) aims at, without its run-to-run differences (wordpiece.py says why)."""
    if not 16 <= vocab_size <= 65535:
        raise ValueError(f"vocab size {vocab_size} out of range: need 16..65535 (shards store uint16 ids)")
    tokens = learn_vocabulary(count_words(texts), vocab_size, SPECIAL_TOKENS, min_frequency=2)
    tok = _new_tokenizer({t: i for i, t in enumerate(tokens)})
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids 0-6 already: they only become "special"
    special_ids(tok)  # <pad> = 0 and all 7 present, by construction; checked all the same
    if out_path:
        save_tokenizer(tok, out_path)
    return tok


def count_words(texts: Iterable[str], batch_chars: int = 1 << 24) -> Counter:
    """How often each word, as the recipe's normaliser and pre-tokenizer make them, occurs in texts: what a
    trainer starts from. Texts are cut into chunks at ' ', '\t', '\n', '\r' (the pipeline is separable there:
    why_not_separable), the chunks of about batch_chars characters counted, and each distinct chunk of such a
    batch goes through the pipeline once."""
    tok = _new_tokenizer()
    normalize, pre_tokenize = tok.normalizer.normalize_str, tok.pre_tokenizer.pre_tokenize_str
    words: Counter = Counter()
    chunks: Counter = Counter()

    def fold() -> None:
        for chunk, n in chunks.items():
            for w, _ in pre_tokenize(normalize(chunk)):
                words[w] += n
        chunks.clear()

    size = 0
    for text in texts:
        chunks.update(_chunks(text))
        size += len(text)
        if size >= batch_chars:
            fold()
            size = 0
    fold()
    return words


def save_tokenizer(tok: Tokenizer, path: str) -> None:
    atomic_write_bytes(path, tok.to_str(pretty=True).encode())


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


# ---------------------------------------------------------------- encoding many documents

# Pipeline pieces that never look across ' ', '\t', '\n' or '\r': the normalisers act on one character at a
# time, or (NFD/NFKD) reorder only between starters, which those four are; the pre-tokenizers split there.
_LOCAL_NORMALIZERS = {"NFD", "NFKD", "Lowercase", "StripAccents", "BertNormalizer"}
_SPLITTING_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
_CHUNK = re.compile(r"[^ \t\n\r]+")
# str.split() cuts at these as well (every c with c.isspace(), less the four; a test checks the list); a text
# without them splits the same way as _CHUNK, only faster
OTHER_SPACES = "\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_OTHER_SPACE = re.compile(f"[{OTHER_SPACES}]")
WHOLE_BATCH_CHARS = 1 << 19
_JOINT_CANDIDATES = "|~^`}{\\#@$%&*+=<>[]_;:!?/,."  # rare in prose first


def _all_of(spec: dict | None, key: str, allowed: set[str]) -> bool:
    if spec is None:
        return key == "normalizers"  # no normaliser is fine, no pre-tokenizer is not (nothing splits)
    if spec["type"] == "Sequence":
        return all(_all_of(s, key, allowed) for s in spec[key])
    return spec["type"] in allowed


def why_not_separable(tok: Tokenizer) -> str | None:
    """None when encoding a text gives the same ids as encoding its chunks between ' ', '\t', '\n', '\r'
    one by one and joining them; otherwise the reason."""
    spec = json.loads(tok.to_str())
    if not _all_of(spec.get("normalizer"), "normalizers", _LOCAL_NORMALIZERS):
        return "its normaliser is not one known to act locally"
    if not _all_of(spec.get("pre_tokenizer"), "pretokenizers", _SPLITTING_PRE_TOKENIZERS):
        return "its pre-tokenizer does not split at whitespace"
    if spec.get("truncation") or spec.get("padding"):
        return "it truncates or pads"
    if (spec.get("model") or {}).get("dropout"):
        return "its model samples (BPE dropout): a word need not encode the same way twice"
    for t in spec.get("added_tokens", []):
        if t["lstrip"] or t["rstrip"] or any(c.isspace() for c in t["content"]):
            return f"its added token {t['content']!r} reaches across whitespace"
    return None


def _chunks(text: str) -> list[str]:
    return _CHUNK.findall(text) if _OTHER_SPACE.search(text) else text.split()


class DocumentEncoder:
    """Token ids of whole documents, as `tok.encode_batch(docs, add_special_tokens=False)` gives them, several
    times faster. A text is cut into chunks at ' ', '\t', '\n', '\r' and each distinct chunk is encoded once
    and remembered: word frequencies are Zipfian, so most chunks are hits. Exact when the tokenizer is
    separable (why_not_separable); others are encoded whole. Text that spells a special token ("<s>") is
    encoded as text, never as that token. At most `max_entries` chunks are remembered (about 130 bytes each for
    words) and at most `max_chars` characters of them, beyond what one call brings (for long unique chunks:
    URLs, base64, minified code).

    New chunks are encoded many per encoder call, joined by a punctuation character that is one token (the
    joint); the joints are found again by that token's id. One call per chunk costs the encoder twice as
    much. Chunks holding the joint character are encoded one by one, and so is a whole batch whose joint
    count comes out wrong (a character the normaliser turns into the joint)."""

    def __init__(self, tok: Tokenizer, max_entries: int = 500_000, max_chars: int = 16_000_000,
                 miss_batch: int = 2048):
        if tok.get_vocab_size() > 65536:
            raise ValueError(f"tokenizer vocabulary {tok.get_vocab_size()} does not fit uint16 ids (max 65536)")
        tok = Tokenizer.from_str(tok.to_str())  # an own copy: the flag below must not leak to the caller
        try:
            tok.encode_special_tokens = True
        except AttributeError:
            raise RuntimeError("fastcram needs tokenizers >= 0.19 (Tokenizer.encode_special_tokens); "
                               "upgrade it with pip install -U tokenizers") from None
        self._encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch  # _fast skips offsets
        self.whole_reason = why_not_separable(tok)
        self.max_entries, self.max_chars, self.miss_batch = max_entries, max_chars, miss_batch
        self.cache: dict[str, bytes] = {}  # chunk -> its ids as uint16 bytes
        self.cached_chars = 0
        self._joint, self._joint_id = None, -1
        for c in _JOINT_CANDIDATES:
            ids = self._encode([f" {c} "], add_special_tokens=False)[0].ids
            if len(ids) == 1 and tok.id_to_token(ids[0]) == c:
                self._joint, self._joint_id = c, ids[0]
                break

    def __call__(self, docs: list[str]) -> list[np.ndarray]:
        """-> one [n_tokens] uint16 array per document."""
        if self.whole_reason is not None:
            return self._whole(docs)
        chunks = [_chunks(d) for d in docs]
        self._learn(chunks)
        return [np.frombuffer(self._look_up(cs), dtype=np.uint16) for cs in chunks]

    def _look_up(self, chunks: list[str]) -> bytes:
        if len(chunks) > 1:
            return b"".join(itemgetter(*chunks)(self.cache))  # a C loop: a third faster than map()
        return self.cache[chunks[0]] if chunks else b""

    def _whole(self, docs: list[str]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        start = 0
        while start < len(docs):  # batches of about WHOLE_BATCH_CHARS: the encoder's own objects are large
            end, size = start, 0
            while end < len(docs) and (end == start or size < WHOLE_BATCH_CHARS):
                size += len(docs[end])
                end += 1
            out += [np.array(e.ids, dtype=np.uint16) for e in self._encode(docs[start:end], add_special_tokens=False)]
            start = end
        return out

    def _learn(self, chunks: list[list[str]]) -> None:
        distinct = set(chain.from_iterable(chunks))
        new = list(distinct.difference(self.cache))
        new_chars = sum(map(len, new))
        if len(self.cache) + len(new) > self.max_entries or self.cached_chars + new_chars > self.max_chars:
            self.cache.clear()  # crude, but the frequent chunks come back at once
            new = list(distinct)
            new_chars, self.cached_chars = sum(map(len, new)), 0
        self.cached_chars += new_chars
        for i in range(0, len(new), self.miss_batch):
            self.cache.update(self._encode_new(new[i:i + self.miss_batch]))

    def _encode_new(self, part: list[str]) -> Iterator[tuple[str, bytes]]:
        """(chunk, ids) for new chunks: those without the joint character from one joined call, the rest (all of
        them when the joined call cannot be split) one by one."""
        if self._joint is not None:
            joinable = [c for c in part if self._joint not in c]
            ids = self._encode_joined(joinable) if joinable else []
            if ids is not None:
                yield from zip(joinable, ids)
                part = [c for c in part if self._joint in c]
        if part:
            yield from zip(part, (np.array(e.ids, dtype=np.uint16).tobytes()
                                  for e in self._encode(part, add_special_tokens=False)))

    def _encode_joined(self, part: list[str]) -> list[bytes] | None:
        """The chunks' ids (uint16 bytes) from one encoder call, or None when the joints cannot be told apart."""
        text = f" {self._joint} ".join(part)
        ids = np.array(self._encode([text], add_special_tokens=False)[0].ids, dtype=np.uint16)
        joints = np.flatnonzero(ids == self._joint_id)
        if len(joints) != len(part) - 1:
            return None
        ends = (2 * (joints - np.arange(len(joints)))).tolist() + [2 * (len(ids) - len(joints))]
        data = np.delete(ids, joints).tobytes()
        return [data[a:b] for a, b in zip([0] + ends[:-1], ends)]
