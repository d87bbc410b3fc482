"""GaC every step: every model's distribution, mapped to the union, averaged by weight."""

from __future__ import annotations

from coordinator.strategies.base import Decision, StepContext, Strategy


class Gac(Strategy):
    name = "gac"

    async def step(self, ctx: StepContext) -> Decision:
        answers = await ctx.ask(range(ctx.n_models))
        return Decision(ctx.mix(answers), ensembled=len(answers) > 1)
