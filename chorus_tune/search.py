"""Candidate ensemble settings, and their accuracy at the first step estimated offline from the members'
summarised first-step distributions: a cheap filter before the few candidates that are run for real."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chorus_tune.calibration import ONE, TEMPERATURES, FirstStep

# Shares of the weight one member may get (the rest split equally among the others).
WEIGHT_SHARES = (0.2, 0.35, 0.65, 0.8)
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
UNITE_TOP_K = (3, 5, 10, 20)  # UniTE's union top-k: which candidates the members vote among


@dataclass(frozen=True)
class Candidate:
    strategy: str  # gac | threshold | unite
    weights: tuple[float, ...]  # normalised
    temperatures: tuple[int, ...]  # indices in TEMPERATURES, one per member
    primary: int | None = None
    threshold: float = 0.5
    top_k: int = 0  # unite: each member's top-k entries form the candidates

    def describe(self, names: Sequence[str]) -> str:
        temps = ", ".join(
            f"{n} T={TEMPERATURES[t]:.2f} w={w:.2f}"
            for n, t, w in zip(names, self.temperatures, self.weights, strict=True)
        )
        gate = f", primary {names[self.primary]}, threshold {self.threshold:g}" if self.primary is not None else ""
        union = f", top-{self.top_k}" if self.strategy == "unite" else ""
        return f"{self.strategy} ({temps}{gate}{union})"


def weight_grid(n: int) -> list[tuple[float, ...]]:
    grid = [tuple([1.0 / n] * n)]
    for i in range(n):
        for share in WEIGHT_SHARES:
            rest = (1.0 - share) / (n - 1)
            grid.append(tuple(share if j == i else rest for j in range(n)))
    return grid


def candidates(n: int, fitted: Sequence[int], primary: int) -> list[Candidate]:
    """gac, threshold (with `primary`) and unite (over UNITE_TOP_K) over the weight grid, each with the
    fitted temperatures and with none (temperature 1)."""
    out: list[Candidate] = []
    for temps in dict.fromkeys([tuple(fitted), (ONE,) * n]):
        for weights in weight_grid(n):
            out.append(Candidate("gac", weights, temps))
            out.extend(Candidate("threshold", weights, temps, primary, t) for t in THRESHOLDS)
            out.extend(Candidate("unite", weights, temps, top_k=k) for k in UNITE_TOP_K)
    return out


def first_step_correct(candidate: Candidate, steps: Sequence[FirstStep], gold: np.ndarray) -> bool:
    """Whether the candidate's greedy first step (over the members' kept entries) starts the gold answer."""
    t = candidate.temperatures
    if candidate.strategy == "unite":
        return _unite_correct(candidate, steps, gold)
    if candidate.primary is not None:
        p = candidate.primary
        probs = steps[p].tempered(t[p])
        if probs.size and probs.max() > candidate.threshold:
            return bool(np.isin(steps[p].uids[np.argmax(probs)], gold))
    uids = np.concatenate([s.uids for s in steps])
    weighted = np.concatenate([s.tempered(ti) * w for s, ti, w in zip(steps, t, candidate.weights, strict=True)])
    unique, inverse = np.unique(uids, return_inverse=True)
    mixed = np.bincount(inverse, weights=weighted, minlength=unique.size)
    return bool(np.isin(unique[np.argmax(mixed)], gold))


def _unite_correct(candidate: Candidate, steps: Sequence[FirstStep], gold: np.ndarray) -> bool:
    """UniTE's greedy first step (coordinator/strategies/unite.py): the candidates are the members' top-k
    entries; each member's probabilities are a softmax over the candidates only, and the weighted mean
    decides. A candidate outside a member's kept entries takes the smallest kept probability (the worker's
    lookup of its own spelling of those bytes is not in the summary; it is at most that, or near it)."""
    tempered = [s.tempered(ti) for s, ti in zip(steps, candidate.temperatures, strict=True)]
    tops = [s.uids[: candidate.top_k] for s in steps]  # kept most likely first
    pool = np.unique(np.concatenate(tops))
    mixed = np.zeros(pool.size)
    for s, p, w in zip(steps, tempered, candidate.weights, strict=True):
        if not p.size:
            continue
        order = np.argsort(s.uids)
        at = np.searchsorted(s.uids, pool, sorter=order).clip(max=s.uids.size - 1)
        found = s.uids[order[at]] == pool
        own = np.where(found, p[order[at]], p.min())
        mixed += w * own / own.sum()
    return bool(pool.size) and bool(np.isin(pool[np.argmax(mixed)], gold))


def first_step_accuracy(
    candidate: Candidate, steps: Sequence[Sequence[FirstStep]], golds: Sequence[np.ndarray]
) -> float:
    """steps[item][member]; golds[item]: the union ids that start the item's gold answer."""
    hits = [first_step_correct(candidate, s, g) for s, g in zip(steps, golds, strict=True)]
    return float(np.mean(hits)) if hits else 0.0
