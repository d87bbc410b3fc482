"""Models' next-bytes distributions mapped into the union vocabulary, and their mixture.

A distribution is sparse: sorted unique union ids with probabilities. Token healing can
produce continuations (the rest of a partly committed token) that no model has as a token;
those get ids past the union's end, shared by all models for the whole request (so a
distribution kept from one step can be read in the next).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chorus_common.sampling import pick
from chorus_common.types import DistributionPart, SamplingParams
from coordinator.union_vocab import DenseMap, UnionVocab

# Below this many entries a sort-based merge beats a dense accumulator of the union's size.
_SPARSE_LIMIT = 4096


class ExtraIds:
    """Request-local union ids for byte strings that are no union entry."""

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

    def tails(self, index: np.ndarray, tokens: list[bytes], skip: int, ids: np.ndarray) -> np.ndarray:
        """The ids of tokens[i][skip:] for these token ids (the union's cached lookups, request-local ids for
        tails that are no union entry)."""
        found = self.union.tail_ids(index, tokens, skip, ids)
        if found is None:
            return np.fromiter((self.uid(tokens[i][skip:]) for i in ids.tolist()), np.int64, ids.size)
        for j in np.flatnonzero(found < 0).tolist():
            found[j] = self.uid(tokens[int(ids[j])][skip:])
        return found

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


def choose(dist: UnionDist, params: SamplingParams, rng: np.random.Generator) -> int:
    """A union id drawn from dist (greedy: its most likely entry)."""
    if dist.uids.size == 0:
        raise ValueError("empty distribution")
    return int(dist.uids[pick(dist.probs, params, rng)])


def from_parts(
    parts: Sequence[DistributionPart], index: np.ndarray, tokens: list[bytes], extras: ExtraIds
) -> UnionDist:
    """Map one model's parts into the union (index: model id -> union id, -1 = not text)."""
    if len(parts) == 1 and parts[0].ids is None and parts[0].skip_bytes == 0 and parts[0].logprobs.size == index.size:
        dense = extras.union.dense_map(index)
        if dense is not None:  # the common step: one full distribution, mapped through a precomputed plan
            return _from_dense(parts[0], dense)
    uids: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    for part in parts:
        p = np.exp(part.logprobs.astype(np.float64) + part.log_scale)
        if part.skip_bytes == 0:
            u = index if part.ids is None else index[part.ids]
        else:
            ids = np.arange(len(index)) if part.ids is None else part.ids.astype(np.int64)
            u = extras.tails(index, tokens, part.skip_bytes, ids)
        keep = u >= 0
        uids.append(u[keep])
        probs.append(p[keep])
    return _merge(uids, probs, extras.size)


def tempered(dist: UnionDist, temperature: float) -> tuple[UnionDist, float]:
    """dist ** (1 / temperature), scaled to keep the mass it had (1 for a full distribution; a top-k
    answer keeps its shipped mass, redistributed among its entries), and the log of that scale (so a
    log-probability x of the same model maps to x / temperature + scale)."""
    total = dist.probs.sum()
    if total <= 0:
        return dist, 0.0
    with np.errstate(divide="ignore"):
        logp = np.log(dist.probs) / temperature
    top = logp.max()
    powered = np.exp(logp - top)
    log_scale = float(np.log(total) - np.log(powered.sum()) - top)
    return UnionDist(dist.uids, powered * np.exp(top + log_scale)), log_scale


def mix(dists: Sequence[UnionDist], weights: Sequence[float], size: int) -> UnionDist:
    """Weighted sum of distributions (weights already normalised)."""
    if len(dists) == 1:
        return dists[0]
    plan = _mix_plan(dists)
    if plan is not None:
        # _merge's sums in the same order (0 + first dist + second ...), over precomputed positions;
        # each dist's positions are distinct, so a fancy-indexed add is a scatter: same bits, faster.
        probs = np.zeros(plan.uids.size)
        start = 0
        for d, w in zip(dists, weights, strict=True):
            probs[plan.positions[start : start + d.probs.size]] += d.probs * w
            start += d.probs.size
        return UnionDist(plan.uids, probs)
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


# Identical results, less work: the fast paths below give exactly the bits the general path gives.
# A dense part lands through the model's DenseMap (no union-sized scratch arrays), and mixing
# distributions whose uids are DenseMap arrays reuses their merged uids and positions.


@functools.cache
def _exp_f16() -> np.ndarray:
    """exp of every float16 value as float64, by bit pattern: np.exp computes each element alone, so
    looking it up gives the same bits as np.exp(x.astype(float64))."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(np.arange(1 << 16, dtype="<u2").view("<f2").astype(np.float64))


def _exp(logprobs: np.ndarray, log_scale: float, ids: np.ndarray) -> np.ndarray:
    """np.exp(logprobs.astype(float64) + log_scale)[ids]."""
    x = logprobs[ids]
    if log_scale == 0.0 and x.dtype == np.dtype("<f2"):
        return _exp_f16()[x.view("<u2")]
    x = x.astype(np.float64)
    if log_scale != 0.0:  # x + 0.0 only turns -0.0 into 0.0, and exp is 1 for both
        x += log_scale
    return np.exp(x)


def _from_dense(part: DistributionPart, dense: DenseMap) -> UnionDist:
    if dense.grouped is not None:
        slot, ids = dense.grouped
        probs = np.bincount(slot, weights=_exp(part.logprobs, part.log_scale, ids), minlength=dense.uids.size)
        return UnionDist(dense.uids, probs)
    probs = _exp(part.logprobs, part.log_scale, dense.first)  # 0.0 + p == p: the first addend alone
    for slots, ids in dense.more:  # further tokens of shared union ids, in token id order as bincount adds them
        probs[slots] += _exp(part.logprobs, part.log_scale, ids)
    return UnionDist(dense.uids, probs)


@dataclass(frozen=True)
class _MixPlan:
    sources: tuple[weakref.ref[np.ndarray], ...]  # the dists' uids arrays this plan is for
    uids: np.ndarray  # their sorted union
    positions: np.ndarray  # where each dist's uids sit in it, one dist after the other


_MIX_PLANS: dict[tuple[int, ...], _MixPlan] = {}
_MIX_PLANS_KEPT = 8  # model subsets x orders in use; plans for arrays that died are rebuilt or evicted


def _mix_plan(dists: Sequence[UnionDist]) -> _MixPlan | None:
    """A merge plan for dists whose uids are all read-only (DenseMap) arrays, cached; else None."""
    if any(d.uids.flags.writeable for d in dists):
        return None
    key = tuple(id(d.uids) for d in dists)
    plan = _MIX_PLANS.get(key)
    if plan is not None and all(ref() is d.uids for ref, d in zip(plan.sources, dists, strict=True)):
        return plan
    uids = np.unique(np.concatenate([d.uids for d in dists]))
    uids.flags.writeable = False
    positions = np.searchsorted(uids, np.concatenate([d.uids for d in dists]))
    plan = _MixPlan(tuple(weakref.ref(d.uids) for d in dists), uids, positions)
    if len(_MIX_PLANS) >= _MIX_PLANS_KEPT:
        _MIX_PLANS.pop(next(iter(_MIX_PLANS)))
    _MIX_PLANS[key] = plan
    return plan
