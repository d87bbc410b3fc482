"""SAFE, generate-verify-ensemble: a drafter writes a few tokens, the other models verify them in
one forward pass each, and only unstable positions are ensembled.

A drafted position is ensembled only if (a) the text before it ends on a token boundary of every
verifier (else the token would be out-of-vocabulary-like for them) and (b) the models do not
already agree: every verifier's top choice is the drafted token, or the models' mean probability
of it exceeds 0.5. These skip rules never change the ensemble's argmax. Drafts after an ensembled
position are discarded (the workers roll them back on their next message); the ensembled
distribution is GaC or UniTE, optionally sharpened.

With `adaptive`, the draft length follows the agreement measured so far in the request
(draft_length.py), up to `draft_tokens`: where the models disagree often, drafts shrink to one token, so a disagreement
throws no drafted work away, and a position costs a pass of each model, as in GaC. The ensemble at
a drafted position reuses the rows the draft and the verification computed there (the workers keep
them): the verifiers' at every position, the drafter's at the draft's first one (unless it drafted
ahead).

While the verifiers check a draft, the drafter already drafts the next chunk as if this one were
accepted (only after a draft that was, with drafts at their longest: the models have agreed for a
while): where the models agree, verifying costs no time on the drafter's path; a speculative chunk
that turns out wrong is discarded and rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

import numpy as np
from pydantic import Field

from coordinator.strategies.base import Decision, Drafted, EnsembleView, StepContext, Strategy
from coordinator.strategies.draft_length import DraftLength
from coordinator.strategies.settings import NAMES_A_MODEL, Problem, StrategySettings
from coordinator.strategies.unite import unite_step
from coordinator.union_dist import UnionDist

_SHARPEN_BELOW = 0.5
_SHARPEN_CANDIDATES = 8


class SafeSettings(StrategySettings):
    drafter: str | None = Field(
        None,
        description="the drafting model's name (unset: the primary model, else the first)",
        json_schema_extra=NAMES_A_MODEL,
    )
    draft_tokens: int = Field(
        5, ge=1, le=64, description="the most tokens drafted per generate-verify cycle (the adaptive length's bound)"
    )
    adaptive: bool = Field(
        False,
        description="draft lengths follow the models' agreement so far (false: every draft is draft_tokens long)",
    )
    ensemble: Literal["gac", "unite"] = Field("gac", description="the distribution at an ensembled position")
    sharpen: bool = Field(
        False, description="add the mass of extending tokens to a candidate when the top is below 0.5"
    )
    top_k: int = Field(10, ge=1, le=1000, description="verifiers' distributions per position, for the skip rules")

    def alone(self) -> SafeSettings:
        return self.model_copy(update={"drafter": None})  # the member alone is its own drafter


class Safe(Strategy):
    name = "safe"
    drafts = True
    Settings = SafeSettings

    @classmethod
    def check_settings(cls, config: EnsembleView) -> list[Problem]:
        drafter = config.safe.drafter
        if drafter is not None and drafter not in config.model_names:
            msg = f"unknown model {drafter!r}; the models are {list(dict.fromkeys(config.model_names))}"
            return [(("safe", "drafter"), msg)]
        return []

    @staticmethod
    def drafter_index(config: EnsembleView) -> int:
        """The drafter: the configured one, else the primary model, else the first."""
        if config.safe.drafter is not None:
            return config.model_names.index(config.safe.drafter)
        primary = config.primary_index
        return 0 if primary is None else primary

    def __init__(self) -> None:
        self._ensemble_next = False
        self._accepted_last = True  # the last draft was accepted whole: worth drafting ahead
        self._ahead: asyncio.Task[Drafted | None] | None = None  # the next chunk, drafted speculatively
        self._length: DraftLength | None = None  # made at the first step, from the request's settings
        self._disputed: int | None = None  # the drafted token at the position being ensembled (union id)

    async def step(self, ctx: StepContext) -> Decision:
        ahead = await self._take_ahead()
        if self._ensemble_next:
            self._ensemble_next = False
            return await self._settle(ctx)
        settings = ctx.config.safe
        if self._length is None:
            self._length = DraftLength(settings.draft_tokens, settings.adaptive)
        drafter = self.drafter_index(ctx.config)
        if not ctx.alive[drafter]:
            return await self._ensemble(ctx)  # no drafter left (policy degrade): ensemble every step
        verifiers = [i for i in range(ctx.n_models) if i != drafter]
        length = min(self._length.current, ctx.remaining)
        if ahead is None:
            ahead = await ctx.draft(drafter, length, report_top_k=settings.top_k)
        drafted = ahead
        if drafted is None:
            return await self._ensemble(ctx)
        left = ctx.remaining - len(drafted.pieces)
        # Drafting ahead pays where drafts are kept whole: after one that was, at the length's bound (on a
        # shared CPU the discarded chunks of drafting ahead at lower agreement cost the verifier time).
        if self._accepted_last and self._length.at_bound and not drafted.ended and left > 0:
            ahead_length = min(settings.draft_tokens, left)
            self._ahead = asyncio.create_task(ctx.draft(drafter, ahead_length, settings.top_k, after=drafted.pieces))
        scored = await ctx.score(verifiers, drafted.pieces, settings.top_k) if verifiers else {}
        return await self._check(ctx, drafted, scored)

    async def _check(self, ctx: StepContext, drafted: Drafted, scored: dict[int, list[UnionDist | None]]) -> Decision:
        """Accept the drafted pieces up to the first position to ensemble; ensemble there (now, or next step)."""
        assert self._length is not None
        choices = [*drafted.pieces, b""] if drafted.ended else drafted.pieces
        for j, piece in enumerate(choices):
            token = ctx.uid(piece)
            at_j = [positions[j] for positions in scored.values()]
            if any(d is None for d in at_j):
                continue  # not a token boundary for some verifier: ensembling here would split its tokens
            dists = [drafted.dists[j], *(d for d in at_j if d is not None)]
            if _agree(token, dists[1:], dists):
                continue
            self._length.checked(j, ensembled=False)
            self._disputed = token
            self._accepted_last = False
            self._ensemble_next = j > 0
            if j == 0:
                await self._take_ahead()  # the drafter's session must be free before it is asked
                return await self._settle(ctx)
            return Decision(pieces=tuple(drafted.pieces[:j]))
        self._length.checked(len(choices), ensembled=False)
        self._accepted_last = True
        return Decision(pieces=tuple(drafted.pieces), end=drafted.ended)

    async def _take_ahead(self) -> Drafted | None:
        """The speculative next chunk, if one was drafted and the chunk before it was accepted whole."""
        if self._ahead is None:
            return None
        task, self._ahead = self._ahead, None
        drafted = await task
        return drafted if self._accepted_last else None

    async def close(self) -> None:
        if self._ahead is not None:
            self._ahead.cancel()
            with contextlib.suppress(BaseException):
                await self._ahead
            self._ahead = None

    async def _settle(self, ctx: StepContext) -> Decision:
        """Ensemble at the disputed drafted position; it counts as a disagreement for the draft length
        only where the ensemble's most likely token is not the drafted one (the skip rules are
        conservative: models that merely tokenize the text differently often still pick it)."""
        decision = await self._ensemble(ctx)
        assert self._length is not None
        kept = decision.dist is not None and decision.dist.uids.size > 0 and decision.dist.top() == self._disputed
        self._length.checked(int(kept), ensembled=not kept)
        return decision

    async def _ensemble(self, ctx: StepContext) -> Decision:
        settings = ctx.config.safe
        if settings.ensemble == "unite":
            decision = await unite_step(ctx, ctx.config.unite.top_k)
        else:
            answers = await ctx.ask(range(ctx.n_models))
            decision = Decision(ctx.mix(answers), ensembled=len(answers) > 1)
        if settings.sharpen and decision.dist is not None and decision.dist.max_prob() < _SHARPEN_BELOW:
            return Decision(_sharpen(decision.dist.normalized(), ctx), ensembled=decision.ensembled)
        return decision


def _agree(token: int, verifiers: list[UnionDist | None], everyone: list[UnionDist | None]) -> bool:
    """Every verifier's top choice is the drafted token, or the mean probability of it exceeds 0.5."""
    if all(d is not None and d.uids.size and d.top() == token for d in verifiers):
        return True
    probs = [_prob(d, token) for d in everyone if d is not None]
    return float(np.mean(probs)) > 0.5


def _prob(dist: UnionDist, uid: int) -> float:
    at = int(np.searchsorted(dist.uids, uid))
    return float(dist.probs[at]) if at < dist.uids.size and dist.uids[at] == uid else 0.0


def _sharpen(dist: UnionDist, ctx: StepContext) -> UnionDist:
    """Add to each leading candidate the mass of entries that extend its bytes (they would write it first)."""
    order = np.argsort(-dist.probs)[:_SHARPEN_CANDIDATES]
    spelled = [ctx.bytes_of(int(u)) for u in dist.uids]
    probs = dist.probs.copy()
    for k in order:
        head = spelled[k]
        if not head:
            continue
        extra = sum(p for s, p in zip(spelled, dist.probs, strict=True) if len(s) > len(head) and s.startswith(head))
        probs[k] += extra
    return UnionDist(dist.uids, probs / probs.sum())
