"""SAFE in lockstep: where the adaptive draft length is down (the models disagree), SAFE does not draft.
Every model is asked for its distribution at the position at once, as GaC asks them, and the skip rule
reads those answers: the drafter's token where the verifiers agree with it, else the ensemble. The
agreement measured there brings drafting back. Driven here through a scripted StepContext (what the
strategy asks, in what order); served end to end in tests/test_strategies.py."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from chorus_common.types import SamplingParams
from coordinator.strategies.base import Decision, Drafted
from coordinator.strategies.safe import Safe, SafeSettings
from coordinator.strategies.unite import UniteSettings
from coordinator.union_dist import UnionDist, mix

END, A, B = 0, 1, 2
SPELLING = {END: b"", A: b"a", B: b"b"}
Calls = list[tuple[str, tuple[int, ...]]]


def _dist(probs: Mapping[int, float]) -> UnionDist:
    uids = sorted(probs)
    return UnionDist(np.array(uids, dtype=np.int64), np.array([probs[u] for u in uids]))


DRAFTER_SAYS_A = _dist({A: 0.6, B: 0.4})
VERIFIER_SAYS_A = _dist({A: 0.9, B: 0.1})
VERIFIER_SAYS_B = _dist({A: 0.05, B: 0.95})


class ScriptedStep:
    """A StepContext over two models (0 drafts, 1 verifies) whose answers are fixed; it records each call."""

    def __init__(self, calls: Calls, verifier: UnionDist, **safe: Any) -> None:
        self.config = SimpleNamespace(
            model_names=("drafter", "verifier"),
            primary_index=0,
            safe=SafeSettings(**safe),
            unite=UniteSettings(),
        )
        self.union = SimpleNamespace(is_end=lambda uid: uid == END)
        self.n_models = 2
        self.weights = [0.5, 0.5]
        self.primary = 0
        self.sampling = SamplingParams()  # greedy
        self.rng = np.random.default_rng(0)
        self.remaining = 100
        self.alive = [True, True]
        self.calls = calls
        self.answers = {0: DRAFTER_SAYS_A, 1: verifier}

    async def ask(self, models: Sequence[int], top_k: int | None = None, partial: bool = False) -> dict[int, UnionDist]:
        self.calls.append(("ask", tuple(models)))
        return {i: self.answers[i] for i in models}

    async def draft(self, model: int, max_tokens: int, report_top_k: int = 0, after: Sequence[bytes] = ()) -> Drafted:
        self.calls.append(("draft", (model,)))
        return Drafted([b"a"] * max_tokens, False, [DRAFTER_SAYS_A] * max_tokens)

    async def score(self, models: Sequence[int], pieces: list[bytes], top_k: int) -> dict[int, list[UnionDist | None]]:
        self.calls.append(("score", tuple(models)))
        return {i: [self.answers[i]] * (len(pieces) + 1) for i in models}

    def mix(self, answers: Mapping[int, UnionDist]) -> UnionDist:
        return mix(list(answers.values()), [self.weights[i] for i in answers], 3)

    def uid(self, data: bytes) -> int:
        return next(u for u, s in SPELLING.items() if s == data)

    def bytes_of(self, uid: int) -> bytes:
        return SPELLING[uid]


def _run(verifiers: Sequence[UnionDist], until_draft: bool = False, **settings: Any) -> tuple[list[Decision], Calls]:
    """SAFE's steps, one per verifier answer given (or, with until_draft, until it drafts), in one event loop."""
    safe, calls = Safe(), []

    async def steps() -> list[Decision]:
        decisions = []
        for verifier in verifiers:
            if until_draft and any(kind == "draft" for kind, _ in calls):
                break
            decisions.append(await safe.step(ScriptedStep(calls, verifier, **settings)))  # type: ignore[arg-type]
        await safe.close()
        return decisions

    return asyncio.run(steps()), calls


def test_disagreeing_models_are_asked_together_once_per_position_as_in_gac() -> None:
    decisions, calls = _run([VERIFIER_SAYS_B] * 6)
    for decision in decisions:
        assert decision.dist is not None and decision.dist.top() == B and decision.ensembled
        assert decision.pieces == ()
    # One call per position, asking both models at once (a concurrent pass each); nothing drafted or scored.
    assert calls == [("ask", (0, 1))] * 6


def test_an_agreeing_verifier_takes_the_drafters_own_token_and_brings_drafting_back() -> None:
    decisions, calls = _run([VERIFIER_SAYS_B] * 3 + [VERIFIER_SAYS_A] * 20, until_draft=True)
    lockstep, drafted = decisions[3:-1], decisions[-1]
    assert calls[: 3 + len(lockstep)] == [("ask", (0, 1))] * (3 + len(lockstep))
    assert lockstep and all(d.pieces == (b"a",) and d.authors == {0, 1} and d.dist is None for d in lockstep)
    assert len(lockstep) == 8  # eight agreeing positions after three disagreements
    assert calls[3 + len(lockstep) : 3 + len(lockstep) + 2] == [("draft", (0,)), ("score", (1,))]
    assert drafted.pieces == (b"a",) * SafeSettings().draft_tokens  # a draft of the bound, verified in one pass
    assert drafted.authors == frozenset()


def test_at_a_requests_tail_a_draft_cut_short_is_not_drawn() -> None:
    """Fewer tokens left than the bound: SAFE steps in lockstep to the end instead of drafting what is
    left (a one-token draft costs a drafter pass, then a verifier pass, in sequence; measured on the real
    pair, the last token of every 24-token request took 280 ms that way against 120 ms in lockstep)."""
    safe, calls, remaining, sizes = Safe(), [], 16, []

    async def steps() -> None:
        nonlocal remaining
        while remaining > 0:
            ctx = ScriptedStep(calls, VERIFIER_SAYS_A)
            ctx.remaining = remaining
            decision = await safe.step(ctx)  # type: ignore[arg-type]
            sizes.append((remaining, calls[-1][0], len(decision.pieces)))
            remaining -= len(decision.pieces)
        await safe.close()

    asyncio.run(steps())
    bound = SafeSettings().draft_tokens
    drafted = [(left, n) for left, kind, n in sizes if kind == "score"]
    assert drafted and all(left >= bound and n == bound for left, n in drafted)  # every draft whole
    tail = [(kind, n) for left, kind, n in sizes if left < bound]
    assert tail and tail == [("ask", 1)] * len(tail)  # the tail in lockstep, a token a step
    assert ("draft", (0,)) in calls


def test_a_request_starts_in_lockstep_until_the_models_have_agreed() -> None:
    _, calls = _run([VERIFIER_SAYS_A])
    assert calls == [("ask", (0, 1))]


def test_fixed_length_drafts_never_step_in_lockstep() -> None:
    _, calls = _run([VERIFIER_SAYS_B] * 4, adaptive=False)
    assert calls[:2] == [("draft", (0,)), ("score", (1,))]
    assert ("ask", (0, 1)) in calls  # the disagreement is ensembled, after the draft and its verification


def test_at_a_one_token_bound_every_position_is_in_lockstep() -> None:
    _, calls = _run([VERIFIER_SAYS_A] * 8 + [VERIFIER_SAYS_B] * 2, draft_tokens=1)
    assert calls == [("ask", (0, 1))] * 10


def test_a_verifier_outvoted_on_the_drafters_token_takes_it_as_text_others_wrote() -> None:
    """The drafter's token is accepted on the mean probability alone; the verifier, which gave it little,
    is no author of it (GaC's rule), so its worker re-reads the text canonically."""
    sure = _dist({A: 0.999, B: 0.001})
    step = ScriptedStep([], VERIFIER_SAYS_B)
    step.answers[0] = sure
    decision = asyncio.run(Safe().step(step))  # type: ignore[arg-type]
    assert decision.pieces == (b"a",) and decision.authors == {0}
