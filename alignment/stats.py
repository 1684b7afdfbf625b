"""The statistics of the evaluation, as pure functions tested against hand-computed values: means with percentile
bootstrap intervals (paired where two policies answer the same prompts), win rates, distinct-n, correlation and
calibration. numpy does the resampling; scipy.stats.bootstrap would add a dependency for the one percentile
interval used here, and its default (BCa) interval is not the one the report describes."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if len(xs) else float("nan")


def bootstrap_ci(
    values: Sequence, statistic: Callable[[list], float] = mean, n_resamples: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(values), resampling the items with replacement. The mean, the
    usual statistic, is taken of all resamples at once (numpy): item by item in Python an interval over 200
    items took 0.3 s, and a report holds a hundred of them."""
    rng = np.random.default_rng(seed)
    k = len(values)
    picks = rng.integers(0, k, size=(n_resamples, k))
    if statistic is mean:
        stats = np.sort(np.asarray(values, dtype=float)[picks].mean(1))
    else:
        stats = sorted(statistic([values[i] for i in row]) for row in picks.tolist())
    lo = stats[int((1 - level) / 2 * n_resamples)]
    hi = stats[min(n_resamples - 1, int((1 + level) / 2 * n_resamples))]
    return float(lo), float(hi)


def estimate(values: Sequence[float], seed: int = 0) -> dict:
    """{"mean", "ci95"}: the mean of values with its bootstrap interval. The mean is summed as the resamples' are
    (numpy): for equal values both are then the same float, and the interval holds the mean."""
    lo, hi = bootstrap_ci(values, seed=seed)
    return {"mean": float(np.mean(np.asarray(values, dtype=float))), "ci95": [lo, hi]}


def paired_difference(after: list[float], before: list[float], seed: int = 0) -> dict:
    """Mean of after - before over the same items, with its 95% paired bootstrap interval."""
    return estimate([a - b for a, b in zip(after, before, strict=True)], seed=seed)


def wins(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per item: 1 if a beats b, 0.5 on a tie, 0 otherwise. Their mean is the win rate of a over b."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def distinct_n(texts: Sequence[str], n: int, words: Callable[[str], list[str]] = str.split) -> float:
    """Distinct word n-grams over all word n-grams of all texts together (0 when there are none); `words` splits a
    text into words (by default at white space)."""
    grams = [tuple(w[i : i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def spread_sample(prompts: Sequence, k: int, seed: int = 0, kind: Callable | None = None) -> list[int]:
    """Indices of k prompts spread evenly over kind(prompt) (e.g. the embedded task's operation), drawn in a
    seeded order and grouped by kind; without kind, k at random in file order. The first k would not do: the
    embedded task's held-out prompts are sorted, so they are all of one operation."""
    order = random.Random(seed).sample(range(len(prompts)), len(prompts))
    if kind is None:
        return sorted(order[:k])
    groups: dict = {}
    for i in order:
        groups.setdefault(kind(prompts[i]), []).append(i)
    queues = [groups[name] for name in sorted(groups)]
    picked: list[int] = []
    while len(picked) < min(k, len(prompts)):
        for queue in queues:  # round robin: no kind gets a second prompt before every kind has had one
            if queue and len(picked) < k:
                picked.append(queue.pop(0))
    rank = {name: n for n, name in enumerate(sorted(groups))}
    return sorted(picked, key=lambda i: (rank[kind(prompts[i])], order.index(i)))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = mean(x), mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def calibration(margins: Sequence[float], buckets: int = 5) -> list[dict]:
    """Accuracy of a reward model by |margin| bucket (equal-count buckets, smallest margins first).

    margins are r(chosen) - r(rejected); a pair is right when its margin is > 0. Each bucket reports the
    accuracy and sigmoid of its mean |margin|, which a calibrated model's accuracy should match.
    """
    ordered = sorted(margins, key=abs)
    size = math.ceil(len(ordered) / buckets)
    out = []
    for i in range(0, len(ordered), size):
        chunk = ordered[i : i + size]
        mean_abs = mean([abs(m) for m in chunk])
        out.append({
            "abs_margin_min": abs(chunk[0]), "abs_margin_max": abs(chunk[-1]), "pairs": len(chunk),
            "accuracy": mean([float(m > 0) for m in chunk]), "predicted": 1 / (1 + math.exp(-mean_abs)),
        })
    return out
