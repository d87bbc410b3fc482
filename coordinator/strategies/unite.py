"""UniTE, union top-k: each model's top-k tokens form the candidates; each model's distribution is
a softmax over the candidates only; a candidate a model has not in its top-k takes the model's
score for the first token of its own spelling of those bytes (one lookup, no forward pass).
"""

from __future__ import annotations

import asyncio

import numpy as np
from pydantic import Field

from coordinator.strategies.base import Decision, StepContext, Strategy
from coordinator.strategies.settings import StrategySettings
from coordinator.union_dist import UnionDist


class UniteSettings(StrategySettings):
    top_k: int = Field(10, ge=1, le=1000, description="each model's top-k tokens form the union of candidates")


class Unite(Strategy):
    name = "unite"
    Settings = UniteSettings

    async def step(self, ctx: StepContext) -> Decision:
        return await unite_of(ctx, await ctx.ask(range(ctx.n_models), top_k=ctx.config.unite.top_k))


async def unite_of(ctx: StepContext, answers: dict[int, UnionDist]) -> Decision:
    """UniTE over the models' top-k answers at this step (asked with UniTE's top_k; also SAFE's ensemble
    at a position)."""
    candidates = np.unique(np.concatenate([d.uids for d in answers.values()]))
    models = list(answers)
    rows = await asyncio.gather(*(_logprobs(ctx, i, answers[i], candidates) for i in models))
    weights = np.array([ctx.weights[i] for i in models])
    weights /= weights.sum()
    probs = np.zeros(candidates.size)
    for w, logp in zip(weights, rows, strict=True):
        p = np.exp(logp - np.logaddexp.reduce(logp))  # softmax over the candidates only
        probs += w * p
    return Decision(UnionDist(candidates, probs), ensembled=len(models) > 1)


async def _logprobs(ctx: StepContext, i: int, dist: UnionDist, candidates: np.ndarray) -> np.ndarray:
    logp = np.full(candidates.size, -np.inf)
    known = np.isin(candidates, dist.uids)
    logp[known] = np.log(np.maximum(dist.probs[np.searchsorted(dist.uids, candidates[known])], 1e-300))
    missing = np.flatnonzero(~known)
    if missing.size:
        looked = await ctx.lookup(i, [ctx.bytes_of(int(u)) for u in candidates[missing]])
        if looked is not None:
            logp[missing] = looked
    return logp
