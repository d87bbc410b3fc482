"""Per-member temperature, fitted the standard way (temperature scaling, Guo et al. 2017): the one that
maximises the likelihood of the gold answers, here the probability a member gives to the first step of
the gold answer (every union entry the gold answer's bytes start with) right after the prompt.

A member's first-step distribution is kept in summary (FirstStep): its top entries, and for each
temperature of the grid the log of its normaliser and of its gold mass, computed once over the whole
distribution, so fitting and searching never hold full distributions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.union_dist import UnionDist

# Temperatures tried: 0.25 to 4, evenly on a log scale (steps of 2 ** (1/6), about 12%), 1 exactly.
TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(4.0), 25))
TEMPERATURES[12] = 1.0
ONE = 12  # index of temperature 1
KEEP = 256  # top entries kept per distribution: enough to find the top of any mixture of them
_FLOOR = -30.0  # log-likelihood of an item whose gold answer has no mass at all (a constant in T)


@dataclass(frozen=True)
class FirstStep:
    """One member's distribution at an item's first step, summarised."""

    uids: np.ndarray  # its KEEP most likely union ids
    logp: np.ndarray  # their log-probabilities (untempered)
    log_norm: np.ndarray  # per temperature: log sum over every entry of p ** (1 / T)
    log_gold: np.ndarray  # per temperature: log sum over the gold entries of p ** (1 / T) (-inf: none)

    def tempered(self, t: int) -> np.ndarray:
        """Probabilities of `uids` at temperature TEMPERATURES[t]."""
        return np.exp(self.logp / TEMPERATURES[t] - self.log_norm[t])

    def gold_logprob(self, t: int) -> float:
        return float(self.log_gold[t] - self.log_norm[t])


def summarize(dist: UnionDist, gold: np.ndarray, keep: int = KEEP) -> FirstStep:
    """dist summarised; gold: the union ids a right answer may start with."""
    with np.errstate(divide="ignore"):
        logp = np.log(dist.probs)
    top_logp = float(logp.max())
    in_gold = np.isin(dist.uids, gold)
    gold_logp = logp[in_gold]
    log_norm = np.empty(TEMPERATURES.size)
    log_gold = np.full(TEMPERATURES.size, -np.inf)
    shifted = logp - top_logp  # <= 0: exp never overflows; one pass per temperature (a logaddexp reduce is slower)
    for t, temperature in enumerate(TEMPERATURES):
        log_norm[t] = top_logp / temperature + np.log(np.exp(shifted / temperature).sum())
        if gold_logp.size:
            g = gold_logp / temperature
            log_gold[t] = float(g.max() + np.log(np.exp(g - g.max()).sum())) if np.isfinite(g.max()) else -np.inf
    top = np.argpartition(-logp, keep)[:keep] if logp.size > keep else np.arange(logp.size)
    top = top[np.lexsort((top, -logp[top]))]  # most likely first, ties in union id order
    return FirstStep(dist.uids[top], logp[top], log_norm, log_gold)


def log_likelihood(steps: Sequence[FirstStep]) -> np.ndarray:
    """Per temperature: the mean log-probability of the gold first step over the items."""
    per_item = np.array([np.maximum(s.log_gold - s.log_norm, _FLOOR) for s in steps])
    return per_item.mean(axis=0)


def fit_temperature(steps: Sequence[FirstStep]) -> int:
    """The index in TEMPERATURES of the likeliest temperature (ties: the one closest to 1)."""
    ll = log_likelihood(steps)
    best = ll.max()
    candidates = np.flatnonzero(ll >= best - 1e-12)
    return int(candidates[np.argmin(np.abs(candidates - ONE))])
