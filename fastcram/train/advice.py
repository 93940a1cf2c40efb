"""Advice the training loop gives once: a budget that will pass over the training data many times."""
from __future__ import annotations

from typing import Callable

MAX_PASSES = 4.0  # more passes than this over the training data is worth a word
REAL_CORPUS = ("fastcram data prepare --out data/wikibook --tokenizer-sample-docs 300000 "
               "--input hf:wikimedia/wikipedia:20231101.en hf:bookcorpus/bookcorpus")


def expected_passes(tokens_per_s: float, remaining_s: float, tokens_done: int, data_tokens: int) -> float:
    """Passes over data_tokens training tokens by the end of the budget at this rate."""
    return (tokens_done + tokens_per_s * remaining_s) / max(data_tokens, 1)


def data_passes_advice(tokens_per_s: float, remaining_s: float, tokens_done: int, data_tokens: int,
                       data_dir: str, builtin: bool) -> tuple[float, str | None]:
    """(expected passes, the message when they are more than MAX_PASSES, else None)."""
    passes = expected_passes(tokens_per_s, remaining_s, tokens_done, data_tokens)
    if passes <= MAX_PASSES:
        return passes, None
    what = "the built-in demo corpus" if builtin else data_dir
    return passes, (
        f"fastcram: at {tokens_per_s / 1e3:,.1f}k tokens/s this budget will pass over the {data_tokens / 1e6:,.1f}M "
        f"training tokens of {what} about {passes:,.0f} times; a model learns more from a larger corpus: prepare "
        f"one (pip install -e '.[corpora]'), e.g. `{REAL_CORPUS}`, and train with --data data/wikibook")


class DataPassesAdvice:
    """The advice given once, at the second log record (the first interval without the compiling first step):
    will the budget pass over the training data more than a few times? That record gets the expected passes."""

    def __init__(self, data_tokens: int, data_dir: str, builtin: bool, warn: Callable[[str], None], log):
        self.data_tokens, self.data_dir, self.builtin, self.warn, self.log = data_tokens, data_dir, builtin, warn, log
        self.records = 0  # log records written by this process

    def __call__(self, rec: dict, remaining_s: Callable[[], float], tokens_done: int) -> None:
        self.records += 1
        if self.records != 2:
            return
        passes, advice = data_passes_advice(rec["tokens_per_s"], remaining_s(), tokens_done, self.data_tokens,
                                            self.data_dir, builtin=self.builtin)
        rec["expected_data_passes"] = round(passes, 2)
        if advice:
            self.warn(advice)
            self.log.write({"event": "advice", "kind": "data_passes", "passes": round(passes, 2), "message": advice})
