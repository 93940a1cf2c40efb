import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

import fastcram.data.tokenizer as tok_mod
from fastcram.data.tokenizer import (SPECIAL_TOKENS, DocumentEncoder, load_tokenizer, special_ids, tokenizer_hash,
                               train_tokenizer)

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Élan vital, naïve café!  Über   spaced   text.",
         "It is a truth universally acknowledged, that a single man in possession of a good fortune."] * 50


def test_round_trip_and_special_ids(tmp_path):
    path = str(tmp_path / "tok.json")
    tok = train_tokenizer(TEXTS, vocab_size=300, out_path=path)
    loaded = load_tokenizer(path)
    ids = special_ids(loaded)
    assert ids.pad == 0
    assert [loaded.id_to_token(i) for i in ids.all] == list(SPECIAL_TOKENS)
    assert tokenizer_hash(loaded) == tokenizer_hash(tok)
    enc = loaded.encode("The  QUICK brown fox", add_special_tokens=False)
    # normaliser: lowercase, whitespace collapsed, WordPiece decoder rejoins pieces
    assert loaded.decode(enc.ids) == "the quick brown fox"
    # accents stripped after NFD
    assert loaded.decode(loaded.encode("Café naïve").ids) == "cafe naive"


def test_special_ids_read_from_file_not_assumed(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=300)
    # a tokenizer whose vocabulary lacks <mask> is refused by name
    vocab = tok.get_vocab()
    bad = Tokenizer(models.WordPiece({t: i for t, i in vocab.items() if t != "<mask>"}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="<mask>"):
        special_ids(bad)


def test_vocab_size_range():
    with pytest.raises(ValueError, match="65535"):
        train_tokenizer(TEXTS, vocab_size=70000)


# ---------------------------------------------------------------- DocumentEncoder

# Pieces chosen to break a chunk-by-chunk encoder that is not exact: whitespace the chunks are not cut at
# (\x0b, \x85, NBSP, U+2028, U+3000), combining marks that could land after a cut, case with context (sigma),
# characters NFD and lowercase grow (İ), CJK, controls, special-token spellings, a word over 100 characters.
PIECES = (["the", "quick", "Fox", "café", "naïve", "Über", "2024", "3.14", "x", "ΣΟΦΙΑ", "ς", "İstanbul", "ﬁne",
           "中文字", "🙂", "\x00", "\x07", "\u200d", "e\u0301", "\u0301", "\u0308\u0327", "<s>", "</s>", "<mask>",
           "<sep>x", "a" * 101, "(", ")", ",", ".", "!", "'", "-", "—", "«", "»"] +
          [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2028", "\u3000"])


def random_docs(rng, n: int) -> list[str]:
    return ["".join(rng.choice(PIECES, size=int(rng.integers(0, 60)))) for _ in range(n)] + ["", " \t\n "]


def hf_ids(tok, docs: list[str]) -> list[list[int]]:
    """The reference: the tokenizer itself on whole documents, special-token spellings encoded as text."""
    ref = Tokenizer.from_str(tok.to_str())
    ref.encode_special_tokens = True
    return [e.ids for e in ref.encode_batch(docs, add_special_tokens=False)]


@pytest.fixture(scope="module")
def unicode_tok():
    rng = np.random.default_rng(0)
    return train_tokenizer(TEXTS + random_docs(rng, 200), vocab_size=400)


@pytest.mark.parametrize("max_entries", [500_000, 7])
def test_document_encoder_matches_the_tokenizer(unicode_tok, max_entries):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    enc = DocumentEncoder(unicode_tok, max_entries=max_entries, miss_batch=5)
    assert enc.whole_reason is None  # the recipe's tokenizer takes the fast path
    for _ in range(3):  # later calls hit the remembered chunks (or, with 7 entries, evict them)
        docs = random_docs(rng, 40)
        got = enc(docs)
        assert all(a.dtype == np.uint16 for a in got)
        assert [a.tolist() for a in got] == hf_ids(unicode_tok, docs), f"seed {seed}"
    assert len(enc.cache) <= max(max_entries, len({c for d in docs for c in d.split()}) + 10)


def test_special_token_spellings_are_text(unicode_tok):
    ids = special_ids(unicode_tok)
    got = DocumentEncoder(unicode_tok)(["a <mask> b <s>", "<sep>"])
    assert not set(ids.all) & set(np.concatenate(got).tolist())
    # the caller's tokenizer is untouched
    assert unicode_tok.encode("<mask>", add_special_tokens=False).ids == [ids.mask]


def byte_level_bpe(texts, vocab_size: int = 300):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def test_other_tokenizers_are_encoded_whole(unicode_tok, monkeypatch, tmp_path):
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 30)
    bpe = byte_level_bpe(TEXTS)
    enc = DocumentEncoder(bpe)
    assert "pre-tokenizer" in enc.whole_reason
    monkeypatch.setattr(tok_mod, "WHOLE_BATCH_CHARS", 50)  # many encoder calls
    assert [a.tolist() for a in enc(docs)] == hf_ids(bpe, docs)
    # ... and cutting into chunks would have been wrong for it: the check is needed
    enc.whole_reason = None
    assert [a.tolist() for a in enc(docs)] != hf_ids(bpe, docs)

    dropout = byte_level_bpe(TEXTS)
    dropout.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    assert DocumentEncoder(dropout).whole_reason is None
    dropout.model = models.BPE(*dropout.model.read_file(*dropout.model.save(str(tmp_path))), dropout=0.5)
    assert "dropout" in DocumentEncoder(dropout).whole_reason

    stripping = Tokenizer.from_str(unicode_tok.to_str())
    stripping.add_special_tokens([AddedToken("[X]", lstrip=True)])
    assert "[X]" in DocumentEncoder(stripping).whole_reason


def test_other_spaces_are_what_str_split_cuts_at_besides_the_four():
    every = {c for c in map(chr, range(0x110000)) if c.isspace()} - set(" \t\n\r")
    assert {c for c in every if tok_mod._OTHER_SPACE.fullmatch(c)} == every
    assert not any(tok_mod._OTHER_SPACE.fullmatch(c) for c in map(chr, range(0x110000)) if c not in every)


def test_remembered_chunks_stay_within_their_memory_budget(unicode_tok):
    """A full cache (max_entries distinct chunks) costs about 130 bytes a chunk, as documented (checked: under 200)."""
    import tracemalloc
    rng = np.random.default_rng(2)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz.,'"))
    words = ["".join(w) for w in rng.choice(letters, size=(120_000, 9))]
    enc = DocumentEncoder(unicode_tok, max_entries=100_000)
    tracemalloc.start()
    try:
        for i in range(0, len(words), 20_000):
            enc([" ".join(words[i:i + 20_000])])
            assert len(enc.cache) <= 100_000
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(enc.cache) > 10_000  # cleared once on the way, then refilled
    print(f"{current / len(enc.cache):.0f} bytes per remembered chunk")
    assert current / len(enc.cache) < 200


def test_long_unique_chunks_are_bounded_by_characters(unicode_tok):
    """Chunks that never repeat (base64, URLs) and are long: the character budget clears the memory, and the
    ids stay right across the clearing."""
    rng = np.random.default_rng(3)
    enc = DocumentEncoder(unicode_tok, max_chars=5_000)
    for _ in range(4):
        docs = [" ".join("".join(rng.choice(list("abcxyz.,"), size=300)) for _ in range(5)) for _ in range(3)]
        assert [a.tolist() for a in enc(docs)] == hf_ids(unicode_tok, docs)
        assert enc.cached_chars == sum(map(len, enc.cache)) <= 5_000
