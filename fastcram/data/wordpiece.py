"""A deterministic WordPiece vocabulary from word counts: the same counts give the same vocabulary, in the same
order, on every run, machine and library version.

Why fastcram has its own: the tokenizers library trains WordPiece with its BPE trainer, which numbers the
continuing subwords ("##e") in the iteration order of a hash map of the words, then breaks ties between
equally frequent pairs by those numbers; two runs on the same text can pick different merges (upstream issue
1794). The algorithm here is the same one, with every choice made by a total order on things that do not depend
on any iteration order:

- ids: the special tokens, then every character seen, by code point, then "##" + every character seen after the
  first of a word, by code point, then each new token in the order its merge made it;
- a word starts as its first character followed by "##" + each further character;
- repeatedly, the most frequent adjacent pair (summed over the words' counts) is merged everywhere, left to right
  and non-overlapping as str.replace does; ties go to the pair with the lower ids (first symbol, then second).
  The new token is the first piece's text plus the second's without "##"; text already in the vocabulary keeps
  its id. It stops when the vocabulary reaches `vocab_size` or the best pair occurs fewer than `min_frequency`
  times.

Counts are sums of integers, so the order the words come in (and the number of processes that counted them)
cannot change the result. A word's symbols are held as a str of chr(id) (2 bytes a symbol; a merge is one
str.replace); `where` lists, per pair, the words that may hold it (duplicates and stale entries are skipped).
"""
from __future__ import annotations

import heapq
from array import array
from typing import Iterable, Mapping

PREFIX = "##"  # marks a piece that continues a word


def _pairs(word: str) -> list[str]:
    """Adjacent symbol pairs of a word, each as a 2-character str."""
    return list(map(str.__add__, word[:-1], word[1:]))


def _merge(w: str, pair: str, new: str, n: int, pair_count: dict[str, int]) -> str | None:
    """w with every occurrence of pair (left to right, non-overlapping) replaced by new; the pair counts of a
    word counted n times updated around each occurrence only. None when w does not hold the pair."""
    starts = []
    at = w.find(pair)
    while at != -1:
        starts.append(at)
        at = w.find(pair, at + 2)
    if not starts:
        return None
    merged = w.replace(pair, new)
    last = len(w) - 2
    for k, at in enumerate(starts):
        j = at - k  # where this occurrence sits in merged
        pair_count[pair] -= n
        if at > 0:  # the pair on its left: (x, a) becomes (x or new, new)
            pair_count[w[at - 1] + pair[0]] -= n
            p = merged[j - 1] + new
            pair_count[p] = pair_count.get(p, 0) + n
        if at < last and (k + 1 == len(starts) or starts[k + 1] != at + 2):  # on its right, unless the next
            pair_count[pair[1] + w[at + 2]] -= n  # occurrence starts there and counts it as its left
            p = new + merged[j + 1]
            pair_count[p] = pair_count.get(p, 0) + n
    return merged


def learn_vocabulary(word_counts: Mapping[str, int], vocab_size: int, special_tokens: Iterable[str],
                     min_frequency: int = 2) -> list[str]:
    """The vocabulary as a list of tokens, index = id (see the module docstring for the rules)."""
    tokens: list[str] = []
    ids: dict[str, int] = {}

    def add(token: str) -> int:
        if token not in ids:
            ids[token] = len(tokens)
            tokens.append(token)
        return ids[token]

    for t in special_tokens:
        add(t)
    firsts, laters = set(), set()
    for w in word_counts:
        firsts.update(w)
        laters.update(w[1:])
    for c in sorted(firsts):
        add(c)
    for c in sorted(laters):
        add(PREFIX + c)
    later_sym = {c: chr(ids[PREFIX + c]) for c in laters}
    words: list[str] = []  # each word as its symbols, chr(id) each
    counts = array("q")
    for w, n in word_counts.items():
        if n > 0 and w:
            words.append(chr(ids[w[0]]) + "".join(map(later_sym.__getitem__, w[1:])))
            counts.append(n)

    pair_count: dict[str, int] = {}
    where: dict[str, array] = {}
    for i, (w, n) in enumerate(zip(words, counts)):
        for p in _pairs(w):
            pair_count[p] = pair_count.get(p, 0) + n
            if p not in where:
                where[p] = array("I")
            where[p].append(i)
    heap = [(-n, ord(p[0]), ord(p[1])) for p, n in pair_count.items()]  # max count first, then lower ids
    heapq.heapify(heap)

    cut = len(PREFIX)
    while len(tokens) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        pair = chr(a) + chr(b)
        n_pair = pair_count.get(pair, 0)
        if n_pair != -neg:  # stale: the count fell since this entry was pushed
            if n_pair > 0:
                heapq.heappush(heap, (-n_pair, a, b))
            continue
        if n_pair < min_frequency:
            break
        new = chr(add(tokens[a] + tokens[b][cut:]))
        grown: set[str] = set()
        for i in set(where.pop(pair)):
            w = words[i]
            merged = _merge(w, pair, new, counts[i], pair_count)
            if merged is None:  # a stale entry: the word lost the pair to an earlier merge
                continue
            for p in _pairs(merged):
                if new in p:  # only pairs with the new symbol appear or grow; the others already list word i
                    if p not in where:
                        where[p] = array("I")
                    where[p].append(i)
                    grown.add(p)
            words[i] = merged
        del pair_count[pair]
        for p in grown:  # one entry with the full count; lower entries of the same pair go stale
            heapq.heappush(heap, (-pair_count[p], ord(p[0]), ord(p[1])))
    return tokens
