"""Choosing one entry from a distribution: greedy, or temperature / top-k / top-p sampling.

`pick` works on a bare probability vector, so workers drafting tokens sample exactly as the
coordinator does when it chooses an entry of the union.
"""

from __future__ import annotations

import numpy as np

from chorus_common.types import SamplingParams


def pick(probs: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """An index into probs (not necessarily normalised): the argmax when greedy, else a draw."""
    if params.temperature == 0:
        return int(np.argmax(probs))
    keep, p = drawn_from(probs, params)
    return int(keep[rng.choice(p.size, p=p)])


def drawn_from(probs: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The distribution pick() draws from: (indices into probs, their probabilities, normalised).
    Sampling: probs tempered, then cut to top-k and top-p. Greedy (which takes the argmax of probs):
    probs itself, normalised."""
    if params.temperature == 0:
        return np.arange(probs.size), probs / probs.sum()
    keep = np.arange(probs.size)
    if params.top_k and params.top_k < probs.size:
        keep = np.argpartition(-probs, params.top_k - 1)[: params.top_k]
    # Temperature in log space, so tiny probabilities do not underflow before scaling.
    logits = np.log(np.maximum(probs[keep], 1e-300)) / params.temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cut = int(np.searchsorted(np.cumsum(p[order]), params.top_p)) + 1
        chosen = order[:cut]
        keep, p = keep[chosen], p[chosen] / p[chosen].sum()
    return keep, p
