import pytest

from fastcram.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_ids, tokenizer_hash, train_tokenizer

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
    from tokenizers import Tokenizer, models
    bad = Tokenizer(models.WordPiece({t: i for t, i in vocab.items() if t != "<mask>"}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="<mask>"):
        special_ids(bad)


def test_vocab_size_range():
    with pytest.raises(ValueError, match="65535"):
        train_tokenizer(TEXTS, vocab_size=70000)
