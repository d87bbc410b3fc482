"""Paired bootstrap: the difference in accuracy of two systems on the same items, with a 95% interval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.1%} [{self.low:+.1%}, {self.high:+.1%}]"


def paired(a: Sequence[bool], b: Sequence[bool], resamples: int = 10_000, seed: int = 0) -> Interval:
    """accuracy(a) - accuracy(b) over the same items, and the 2.5th and 97.5th percentiles of that
    difference over `resamples` resamplings of the items with replacement (seeded: deterministic)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired bootstrap needs two equally long, non-empty lists of outcomes")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(diff.mean()), float(low), float(high))


def single(a: Sequence[bool], resamples: int = 10_000, seed: int = 0) -> Interval:
    """accuracy(a) and its bootstrap 95% interval."""
    return paired(a, [False] * len(a), resamples, seed)
