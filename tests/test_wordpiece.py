"""fastcram's deterministic WordPiece trainer: its merges against a naive reference, its word counts against the
tokenizer's own pipeline, one tokenizer.json for any order of the same text, and the tokenizers library's
trainer as the quality bar."""
import hashlib
import lzma
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from tokenizers import trainers

from fastcram.data.builtin import builtin_corpus_path
from fastcram.data.sources import _plain_documents
from fastcram.data.tokenizer import SPECIAL_TOKENS, DocumentEncoder, _new_tokenizer, count_words, train_tokenizer
from fastcram.data.wordpiece import learn_vocabulary
from tests.test_tokenizer import random_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def naive_vocabulary(word_counts: dict, vocab_size: int, specials, min_frequency: int) -> list[str]:
    """The specification, computed the slow way: all pair counts recounted before every merge."""
    vocab = list(specials)
    for c in sorted({c for w in word_counts for c in w}):
        vocab += [c] if c not in vocab else []
    for c in sorted({c for w in word_counts for c in w[1:]}):
        vocab += ["##" + c] if "##" + c not in vocab else []
    words = [([w[0]] + ["##" + c for c in w[1:]], n) for w, n in word_counts.items()]
    while len(vocab) < vocab_size:
        counts = Counter()
        for syms, n in words:
            for pair in zip(syms, syms[1:]):
                counts[pair] += n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], vocab.index(p[0]), vocab.index(p[1])))
        if counts[best] < min_frequency:
            break
        new = best[0] + best[1][2:]
        if new not in vocab:
            vocab.append(new)
        merged = []
        for syms, n in words:
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            merged.append((out, n))
        words = merged
    return vocab


@pytest.mark.parametrize("letters", ["abcé", "ab"])
@pytest.mark.parametrize("min_frequency", [1, 2, 3])
def test_merges_match_a_naive_reference(min_frequency, letters):
    """Fresh random words over a tiny alphabet: equal counts everywhere, so the tie-breaks are exercised; runs
    like 'aaaa' and 'abab' test non-overlapping and adjacent merges; words that merge into the same text test
    reused ids."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    words = {"".join(rng.choice(list(letters), size=int(rng.integers(1, 13)))): int(rng.integers(1, 6))
             for _ in range(70)}
    for vocab_size in (10, int(rng.integers(20, 60)), 500):
        got = learn_vocabulary(words, vocab_size, ["<pad>", "<unk>"], min_frequency)
        want = naive_vocabulary(words, vocab_size, ["<pad>", "<unk>"], min_frequency)
        assert got == want, f"seed {seed}, vocab {vocab_size}"
    assert len(got) < 500 and len(got) > len(learn_vocabulary(words, 0, ["<pad>", "<unk>"]))


def test_word_counts_are_the_pipelines_on_whole_texts():
    """Counting chunk by chunk (in small batches here) equals the tokenizer's normaliser and pre-tokenizer run on
    each whole text: odd whitespace, combining marks, special-token spellings and all."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    docs = random_docs(np.random.default_rng(seed), 80)
    tok = _new_tokenizer()
    want = Counter(w for d in docs for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(d)))
    assert count_words(docs, batch_chars=200) == want, f"seed {seed}"
    assert count_words(iter(docs)) == want


def sample_docs() -> list[str]:
    """About 250 KB of the built-in corpus as documents."""
    with lzma.open(builtin_corpus_path(), "rt", encoding="utf-8") as f:
        return list(_plain_documents(f.read(250_000).splitlines(), 4000))


@pytest.fixture(scope="module")
def sample() -> list[str]:
    return sample_docs()


def digest(tok) -> str:
    return hashlib.sha256(tok.to_str(pretty=True).encode()).hexdigest()


def test_twenty_trainings_give_one_tokenizer_json(sample, tmp_path):
    """20 trainings, the documents in a fresh random order each time (the counts, and so the result, cannot
    depend on order), and one in a process with another string-hash seed: one file."""
    rng = np.random.default_rng()
    files = set()
    for i in range(20):
        docs = [sample[j] for j in rng.permutation(len(sample))] if i else sample
        path = tmp_path / f"tok{i}.json"
        train_tokenizer(docs, 2000, out_path=str(path))
        files.add(path.read_bytes())
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.test_wordpiece import sample_docs; "
            "from fastcram.data.tokenizer import train_tokenizer; train_tokenizer(sample_docs(), 2000, sys.argv[2])")
    for seed in ("1", "12345"):
        subprocess.run([sys.executable, "-c", code, ROOT, str(tmp_path / "other.json")], check=True, timeout=120,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        files.add((tmp_path / "other.json").read_bytes())
    assert len(files) == 1


def test_as_good_as_the_tokenizers_librarys_trainer(sample):
    """The library's WordPieceTrainer (what fastcram used before) on the same text: about the same vocabulary and
    tokens per character within 1% (bench/RESULTS.md has the whole built-in corpus)."""
    ours = train_tokenizer(sample, 4000)
    theirs = _new_tokenizer()
    theirs.train_from_iterator(sample, trainer=trainers.WordPieceTrainer(
        vocab_size=4000, special_tokens=list(SPECIAL_TOKENS), min_frequency=2, show_progress=False))
    assert ours.get_vocab_size() == theirs.get_vocab_size()
    assert len(set(ours.get_vocab()) & set(theirs.get_vocab())) >= 0.98 * theirs.get_vocab_size()
    rate = [sum(map(len, DocumentEncoder(t)(sample))) / sum(map(len, sample)) for t in (ours, theirs)]
    assert abs(rate[0] / rate[1] - 1) < 0.01, rate
