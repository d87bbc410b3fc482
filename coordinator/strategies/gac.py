"""GaC every step: every model's distribution, mapped to the union, averaged by weight."""

from __future__ import annotations

from coordinator.strategies.base import Decision, StepContext, Strategy


class Gac(Strategy):
    name = "gac"

    async def step(self, ctx: StepContext) -> Decision:
        models = list(range(ctx.n_models))
        dists = await ctx.ask(models)
        return Decision(ctx.mix(dists, models), ensembled=len(models) > 1)
