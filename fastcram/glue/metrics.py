"""GLUE metrics in numpy, the per-task scores, the median over seeds, the 9-number average and the table.

Scores are reported in percent, as in the recipe's table. Conventions where a metric is undefined: Matthews
correlation and F1 are 0 when their denominator is 0, Pearson and Spearman are 0 for constant predictions
(a model that predicts one value has learned nothing), so the average never turns into nan.
"""
from __future__ import annotations

import math

import numpy as np

# The recipe's table: columns in this order; MNLI shows matched/mismatched in one cell.
TABLE_COLUMNS = [("MNLI m/mm", ("mnli_m", "mnli_mm")), ("SST-2", ("sst2",)), ("STS-B", ("stsb",)),
                 ("RTE", ("rte",)), ("QNLI", ("qnli",)), ("QQP", ("qqp",)), ("MRPC", ("mrpc",)),
                 ("CoLA", ("cola",))]
SCORE_KEYS = [k for _, keys in TABLE_COLUMNS for k in keys]  # the 9 numbers of the average


def accuracy(pred, label) -> float:
    pred, label = np.asarray(pred), np.asarray(label)
    return float((pred == label).mean())


def _confusion(pred, label) -> tuple[int, int, int, int]:
    """tp, fp, fn, tn of binary labels with 1 as the positive class."""
    p, y = np.asarray(pred) == 1, np.asarray(label) == 1
    return int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum()), int((~p & ~y).sum())


def f1(pred, label) -> float:
    tp, fp, fn, _ = _confusion(pred, label)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(pred, label) -> float:
    tp, fp, fn, tn = _confusion(pred, label)
    denom = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom else 0.0


def rank(x) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each run of equal values
    ends = np.r_[starts[1:], len(xs)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x, y) -> float:
    return pearson(rank(x), rank(y))


def task_metrics(task: str, pred, label) -> dict[str, float]:
    """All metrics of one task on one dev split, in percent. `pred`: class ids, or scores for STS-B."""
    if task == "stsb":
        return {"pearson": 100 * pearson(pred, label), "spearman": 100 * spearman(pred, label)}
    out = {"accuracy": 100 * accuracy(pred, label)}
    if task in ("mrpc", "qqp"):
        out["f1"] = 100 * f1(pred, label)
    if task == "cola":
        out["matthews"] = 100 * matthews(pred, label)
    return out


MAIN_METRIC = {"cola": "matthews", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}  # others: accuracy


def score_key(task: str, split: str) -> str:
    """The table's key of one dev split: mnli_m / mnli_mm for MNLI, the task name otherwise."""
    return {"matched": "mnli_m", "mismatched": "mnli_mm"}[split] if task == "mnli" else task


def median_over_seeds(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """runs: per seed, {dev split: {metric: value}} -> {dev split: {metric: median over seeds}}."""
    return {split: {m: float(np.median([r[split][m] for r in runs])) for m in runs[0][split]}
            for split in runs[0]}


def summarize(medians: dict[str, dict[str, dict[str, float]]]) -> dict:
    """medians: {task: {dev split: {metric: median}}} -> the 9 scores (those present) and their average."""
    scores = {}
    for task, splits in medians.items():
        for split, metrics in splits.items():
            scores[score_key(task, split)] = metrics[MAIN_METRIC.get(task, "accuracy")]
    present = [k for k in SCORE_KEYS if k in scores]
    avg = float(np.mean([scores[k] for k in present])) if present else None
    return {"scores": {k: scores[k] for k in present}, "avg": avg, "avg_over": present,
            "complete": len(present) == len(SCORE_KEYS)}


def format_table(label: str, summary: dict) -> str:
    """A markdown table in the recipe's column order; '-' for a task not run. A partial average says so."""
    s = summary["scores"]

    def cell(keys):
        return "/".join(f"{s[k]:.1f}" if k in s else "-" for k in keys)

    avg = "-" if summary["avg"] is None else f"{summary['avg']:.1f}"
    if summary["avg"] is not None and not summary["complete"]:
        avg += f" ({len(summary['avg_over'])} of {len(SCORE_KEYS)})"
    head = ["model"] + [name for name, _ in TABLE_COLUMNS] + ["avg"]
    row = [label] + [cell(keys) for _, keys in TABLE_COLUMNS] + [avg]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"]
    return "\n".join(lines) + "\n"
