"""GaC thresholded: the primary model decides alone while it is confident.

Only when the primary's top probability is at or below the threshold are the other models
asked; they catch up on the text they skipped in one forward pass, so gating saves their compute.
"""

from __future__ import annotations

from coordinator.strategies.base import Decision, StepContext, Strategy


class Threshold(Strategy):
    name = "threshold"
    needs_primary = True

    async def step(self, ctx: StepContext) -> Decision:
        assert ctx.primary is not None
        answers = await ctx.ask([ctx.primary])  # empty if the primary's worker was lost (degrade)
        primary = answers.get(ctx.primary)
        if primary is not None and (primary.max_prob() > ctx.threshold or ctx.n_models == 1):
            return Decision(primary, ensembled=False)
        answers |= await ctx.ask([i for i in range(ctx.n_models) if i != ctx.primary])
        return Decision(ctx.mix(answers), ensembled=len(answers) > 1)
