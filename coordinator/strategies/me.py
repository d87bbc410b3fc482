"""ME, mixture-model-like ensemble: each token comes from one model drawn by weight.

Sampling from the weighted mixture sum_i w_i * M_i equals drawing a model i ~ w and sampling from
M_i alone, so only one model computes per token. The draws do not depend on the text, so the
schedule is drawn ahead: a run of consecutive tokens by one model is generated inside its worker
in one call, and a model that sat out catches up on the text it missed in the first forward pass
of its next run. Exact only for sampling: greedy, top-k and top-p are refused. A temperature T
applies to each model's own distribution (the mixture of the tempered models).
"""

from __future__ import annotations

from collections import deque

import numpy as np
from pydantic import Field

from chorus_common.types import SamplingParams
from coordinator.strategies.base import Decision, StepContext, Strategy
from coordinator.strategies.settings import StrategySettings

_BLOCK = 256  # schedule entries drawn at a time


class MeSettings(StrategySettings):
    max_run: int = Field(32, ge=1, le=4096, description="tokens one model draws per call at most")


class Me(Strategy):
    name = "me"
    drafts = True
    Settings = MeSettings

    def __init__(self) -> None:
        self._schedule: deque[int] = deque()

    @classmethod
    def check(cls, sampling: SamplingParams) -> None:
        if sampling.temperature == 0:
            raise ValueError("temperature: 'me' samples from the mixture of the models; greedy (0) has no such meaning")
        if sampling.top_k or sampling.top_p < 1.0:
            field = "top_k" if sampling.top_k else "top_p"
            raise ValueError(f"{field}: 'me' samples from the whole mixture; top-k/top-p cuts are not supported")

    async def step(self, ctx: StepContext) -> Decision:
        while True:
            model, run = self._next_run(ctx, min(ctx.remaining, ctx.config.me.max_run))
            drafted = await ctx.draft(model, run)
            if drafted is not None:
                return Decision(pieces=tuple(drafted.pieces), end=drafted.ended)
            # The model's worker was lost (policy degrade): its turns go to the others from now on.
            self._schedule.clear()

    def _next_run(self, ctx: StepContext, limit: int) -> tuple[int, int]:
        """The next scheduled model and how many consecutive tokens it draws (at most limit)."""
        if not self._schedule:
            self._draw(ctx)
        model, run = self._schedule.popleft(), 1
        while run < limit:
            if not self._schedule:
                self._draw(ctx)
            if self._schedule[0] != model:
                break
            self._schedule.popleft()
            run += 1
        return model, run

    def _draw(self, ctx: StepContext) -> None:
        weights = np.array([w if alive else 0.0 for w, alive in zip(ctx.weights, ctx.alive, strict=True)])
        self._schedule.extend(int(i) for i in ctx.rng.choice(ctx.n_models, size=_BLOCK, p=weights / weights.sum()))
