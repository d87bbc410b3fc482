"""SAFE, generate-verify-ensemble: a drafter writes a few tokens, the other models verify them in
one forward pass each, and only unstable positions are ensembled.

A drafted position is ensembled only if (a) the text before it ends on a token boundary of every
verifier (else the token would be out-of-vocabulary-like for them) and (b) the models do not
already agree: every verifier's top choice is the drafted token, or the models' mean probability
of it exceeds 0.5. These skip rules never change the ensemble's argmax. Drafts after an ensembled
position are discarded (the workers roll them back on their next message); the ensembled
distribution is GaC or UniTE, optionally sharpened.

With `adaptive` (the default), SAFE drafts only where the models have agreed for a while: the
draft length follows the agreement measured so far in the request (draft_length.py), and drafts are
drawn only at its upper bound, `draft_tokens`, and only whole. Elsewhere (below the bound, and at a
request's tail, where fewer tokens are left than the bound) SAFE steps in lockstep: every model is
asked for its distribution at the position at once, as GaC asks them, one concurrent pass each, where
a short draft costs the drafter's passes and then the verifiers' pass, in sequence. Skip rule (b) then
reads those answers: the drafter's own most likely token (its draw, when sampling) where the verifiers
agree with it, else the ensemble of the same answers, with no further call; with equal weights and
greedy decoding that is GaC's choice at every position. Rule (a) needs the verifiers to have seen the
drafted token, so in lockstep every position is checked against their next-bytes distributions, which
extend a verifier's open last token (token healing) as GaC's do. Every lockstep position feeds the
draft length like a checked drafted one, so drafting resumes once the models agree again.
`adaptive: false`: every draft is `draft_tokens` long, and every position is drafted. The ensemble at
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
from coordinator.strategies.unite import unite_of
from coordinator.union_dist import UnionDist, choose

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
        True,
        description="draft only where the models have agreed for a while, elsewhere ask every model at once "
        "per position, as GaC does (false: every position is drafted, every draft draft_tokens long)",
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
        # In lockstep below the bound, and at a request's tail, where the tokens left cut a draft short of it.
        cut_short = self._length.adaptive and length < settings.draft_tokens
        if ahead is None and verifiers and (self._length.lockstep or cut_short):
            return await self._lockstep(ctx, drafter, verifiers)
        if ahead is None:
            ahead = await ctx.draft(drafter, length, report_top_k=settings.top_k)
        drafted = ahead
        if drafted is None:
            return await self._ensemble(ctx)
        left = ctx.remaining - len(drafted.pieces)
        # Drafting ahead pays where drafts are kept whole: after one that was, at the length's bound (on a
        # shared CPU the discarded chunks of drafting ahead at lower agreement cost the verifier time).
        # Adaptive drafts ahead are whole too: a shorter one's verification would cost more than lockstep.
        whole = left >= settings.draft_tokens or not self._length.adaptive
        if self._accepted_last and self._length.at_bound and not drafted.ended and left > 0 and whole:
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
            self._accepted_last = False
            self._ensemble_next = j > 0
            if j == 0:
                await self._take_ahead()  # the drafter's session must be free before it is asked
                return await self._settle(ctx)
            return Decision(pieces=tuple(drafted.pieces[:j]))
        self._length.checked(len(choices), ensembled=False)
        self._accepted_last = True
        return Decision(pieces=tuple(drafted.pieces), end=drafted.ended)

    async def _lockstep(self, ctx: StepContext, drafter: int, verifiers: list[int]) -> Decision:
        """Every model's distribution at the position, asked concurrently (GaC's step); the drafter's token
        where the verifiers agree with it (skip rule b), else the ensemble of the same answers."""
        assert self._length is not None
        answers = await self._ask_all(ctx)
        mine = answers.get(drafter)
        if mine is None or mine.uids.size == 0:  # the drafter's worker was lost just now (policy degrade)
            return await self._ensemble_of(ctx, answers)
        token = choose(mine, ctx.sampling, ctx.rng)  # what it would draw itself (greedy: its most likely token)
        theirs: list[UnionDist | None] = [answers[i] for i in verifiers if i in answers]
        agreed = _agree(token, theirs, [mine, *theirs])
        self._length.checked(int(agreed), ensembled=not agreed)  # as it would have stopped a draft there, or not
        # Drafts resume only after a run of agreeing positions: the first one is drafted ahead of too.
        self._accepted_last = agreed
        if agreed:
            if ctx.union.is_end(token):
                return Decision(end=True)
            return Decision(pieces=(ctx.bytes_of(token),), authors=_authors(ctx, answers, token, drafter))
        return await self._ensemble_of(ctx, answers)

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
        """Ensemble at the disputed drafted position. It counts as a disagreement for the draft length
        whatever the ensemble picks there: the skip rule stopped the draft at it, and what the length
        weighs is how far drafts get."""
        assert self._length is not None
        self._length.checked(0, ensembled=True)
        return await self._ensemble(ctx)

    async def _ensemble(self, ctx: StepContext) -> Decision:
        return await self._ensemble_of(ctx, await self._ask_all(ctx))

    @staticmethod
    async def _ask_all(ctx: StepContext) -> dict[int, UnionDist]:
        """Every model's distribution at the position, concurrently, as the ensemble needs it."""
        unite = ctx.config.safe.ensemble == "unite"
        return await ctx.ask(range(ctx.n_models), top_k=ctx.config.unite.top_k if unite else None)

    async def _ensemble_of(self, ctx: StepContext, answers: dict[int, UnionDist]) -> Decision:
        """The ensembled distribution of the models' answers at the position (GaC or UniTE), maybe sharpened."""
        settings = ctx.config.safe
        if settings.ensemble == "unite":
            decision = await unite_of(ctx, answers)
        else:
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


def _authors(ctx: StepContext, answers: dict[int, UnionDist], token: int, drafter: int) -> frozenset[int]:
    """Who takes the drafter's token as its own in lockstep: the drafter, and each model GaC would count
    as an author had it chosen the token (its own share of it is at least half the weighted mix's)."""
    shares = {i: _prob(d, token) / max(float(d.probs.sum()), 1e-300) for i, d in answers.items()}
    weights = {i: ctx.weights[i] for i in answers}
    mixed = sum(weights[i] * shares[i] for i in answers) / sum(weights.values())
    return frozenset({drafter, *(i for i in answers if shares[i] >= 0.5 * mixed)})


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
