"""Models' next-bytes distributions mapped into the union vocabulary, and their mixture.

A distribution is sparse: sorted unique union ids with probabilities. Token healing can
produce continuations (the rest of a partly committed token) that no model has as a token;
those get step-local ids past the union's end, shared by all models within the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.types import WirePart
from coordinator.union_vocab import UnionVocab

# Below this many entries a sort-based merge beats a dense accumulator of the union's size.
_SPARSE_LIMIT = 4096


class StepExtras:
    """Step-local union ids for byte strings that are no union entry."""

    def __init__(self, union: UnionVocab) -> None:
        self.union = union
        self.by_bytes: dict[bytes, int] = {}
        self.bytes_by_id: dict[int, bytes] = {}

    def uid(self, data: bytes) -> int:
        found = self.union.lookup(data)
        if found is not None:
            return found
        if data not in self.by_bytes:
            new = self.union.size + len(self.by_bytes)
            self.by_bytes[data] = new
            self.bytes_by_id[new] = data
        return self.by_bytes[data]

    def bytes_of(self, uid: int) -> bytes:
        if uid < self.union.size:
            return self.union.bytes_of(uid)
        return self.bytes_by_id[uid]

    @property
    def size(self) -> int:
        return self.union.size + len(self.by_bytes)


@dataclass(frozen=True)
class UnionDist:
    uids: np.ndarray  # int64, sorted, unique
    probs: np.ndarray  # float64

    def top(self) -> int:
        """The most likely union id (ties: the lowest)."""
        return int(self.uids[np.argmax(self.probs)])

    def max_prob(self) -> float:
        return float(self.probs.max()) if self.probs.size else 0.0

    def normalized(self) -> UnionDist:
        total = self.probs.sum()
        return self if total <= 0 else UnionDist(self.uids, self.probs / total)


def from_parts(parts: Sequence[WirePart], index: np.ndarray, tokens: list[bytes], extras: StepExtras) -> UnionDist:
    """Map one model's parts into the union (index: model id -> union id, -1 = not text)."""
    uids: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    for part in parts:
        p = np.exp(part.logprobs.astype(np.float64) + part.log_scale)
        if part.skip_bytes == 0:
            u = index if part.ids is None else index[part.ids]
        else:
            ids = range(len(index)) if part.ids is None else part.ids.tolist()
            u = np.fromiter((extras.uid(tokens[i][part.skip_bytes :]) for i in ids), dtype=np.int64)
        keep = u >= 0
        uids.append(u[keep])
        probs.append(p[keep])
    return _merge(uids, probs, extras.size)


def mix(dists: Sequence[UnionDist], weights: Sequence[float], size: int) -> UnionDist:
    """Weighted sum of distributions (weights already normalised)."""
    if len(dists) == 1:
        return dists[0]
    return _merge([d.uids for d in dists], [d.probs * w for d, w in zip(dists, weights, strict=True)], size)


def _merge(uids: list[np.ndarray], probs: list[np.ndarray], size: int) -> UnionDist:
    all_uids = np.concatenate(uids) if uids else np.zeros(0, np.int64)
    all_probs = np.concatenate(probs) if probs else np.zeros(0)
    if all_uids.size < _SPARSE_LIMIT:
        unique, inverse = np.unique(all_uids, return_inverse=True)
        return UnionDist(unique, np.bincount(inverse, weights=all_probs, minlength=unique.size))
    dense = np.bincount(all_uids, weights=all_probs, minlength=size)
    present = np.zeros(dense.size, dtype=bool)
    present[all_uids] = True
    nonzero = np.flatnonzero(present)
    return UnionDist(nonzero, dense[nonzero])
