"""One conversation's generation loop: the coordinator owns the text and decides each step."""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import TypeVar

import grpc
import numpy as np

from coordinator.ensemble import Ensemble, Member, NotReady, Replica
from coordinator.metrics import RequestMetrics
from coordinator.sampling import choose
from coordinator.strategies import STRATEGIES
from coordinator.types import Finished, GenerationRequest, ModelUsage, TextPiece, Usage
from coordinator.union_dist import StepExtras, UnionDist, from_parts, mix
from coordinator.workers import ModelSession

log = logging.getLogger(__name__)
T = TypeVar("T")


class ContextExhausted(Exception):
    """A member's context is full: the generation ends with finish reason 'length'."""


class WorkerLost(Exception):
    """A member's worker died or hung, and the request's policy is 'fail' (or no model is left)."""


# Codes that mean the worker itself failed (died, restarted, crashed), not the request.
_LOST_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
               grpc.StatusCode.INTERNAL}  # fmt: skip


class _Step:
    """The StepContext strategies see; sends each asked model the text it has not seen yet."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        assert run.ensemble.union is not None  # checked ready before the first step
        self.extras = StepExtras(run.ensemble.union)
        self.n_models = len(run.ensemble.members)
        self.weights = list(run.request.weights) or [m.weight for m in run.ensemble.members]
        self.primary = run.ensemble.primary
        self.threshold = run.request.threshold
        self.answers: dict[int, UnionDist] = {}  # model index -> its distribution this step

    async def ask(self, models: Sequence[int]) -> dict[int, UnionDist]:
        alive = [i for i in models if self._run.alive[i]]
        results = await asyncio.gather(*(self._ask_one(i) for i in alive))
        answers = {i: d for i, d in zip(alive, results, strict=True) if d is not None}
        if not any(self._run.alive):
            raise WorkerLost(f"every model's worker was lost: {', '.join(self._run.usage.lost_models)}")
        self.answers.update(answers)
        return answers

    def top_choices(self) -> dict[int, int]:
        return {i: d.top() for i, d in self.answers.items() if d.uids.size}

    async def _ask_one(self, i: int) -> UnionDist | None:
        run, member = self._run, self._run.ensemble.members[i]
        append, run.unsent[i] = run.unsent[i], b""
        started = time.perf_counter()
        step = await run.guarded(i, run.sessions[i].step(append, run.ensemble.transport), run.step_budget(i))
        if step is None:
            return None
        run.slowest[i] = max(run.slowest[i], time.perf_counter() - started)
        usage = run.usage.models[i]
        usage.forward_passes += step.forward_passes
        usage.tokens_fed += step.tokens_fed
        assert member.vocab is not None  # checked ready before the first step
        return from_parts(step.parts, member.index, member.vocab.tokens, self.extras)

    def mix(self, answers: Mapping[int, UnionDist]) -> UnionDist:
        weights = np.array([self.weights[i] for i in answers])
        return mix(list(answers.values()), weights / weights.sum(), self.extras.size)


class _Run:
    def __init__(self, ensemble: Ensemble, request: GenerationRequest, sessions: list[ModelSession]) -> None:
        self.ensemble = ensemble
        self.request = request
        self.sessions = sessions
        self.unsent = [b""] * len(sessions)
        self.usage = Usage(models=[ModelUsage(m.spec.name) for m in ensemble.members])
        self.alive = [True] * len(sessions)
        self.slowest = [0.0] * len(sessions)  # seconds, per model; 0 = no step answered yet

    def step_budget(self, i: int) -> float:
        """How long model i may take: long for its first step (the prefill), short after."""
        if self.slowest[i] == 0.0:
            return self.request.first_step_timeout
        return max(self.request.step_timeout, 4 * self.slowest[i])

    async def guarded(self, i: int, call: Awaitable[T], budget: float) -> T | None:
        """Run a call to model i's worker; None if the worker was lost and the policy is degrade."""
        name = self.ensemble.members[i].spec.name
        try:
            return await asyncio.wait_for(call, budget)
        except TimeoutError:
            reason = f"no answer within {budget:.1f} s"
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                raise ContextExhausted(exc.details()) from exc
            if exc.code() not in _LOST_CODES:
                raise
            reason = f"{exc.code().name}: {exc.details()}"
        self.sessions[i].cancel()
        if self.request.on_worker_loss != "degrade":
            raise WorkerLost(f"the worker of model {name!r} was lost ({reason})")
        log.warning("request %s goes on without %s: its worker was lost (%s)", self.request.request_id, name, reason,
                    extra={"request_id": self.request.request_id, "lost_model": name})  # fmt: skip
        self.alive[i] = False
        self.usage.lost_models.append(name)
        return None


async def generate(
    ensemble: Ensemble, request: GenerationRequest, timeout: float | None = None
) -> AsyncIterator[TextPiece | Finished]:
    """Yield text pieces, then one Finished. Closing the iterator cancels the workers' sessions."""
    started = time.perf_counter()
    strategy = STRATEGIES[request.strategy]()
    ensemble.check_ready()
    placed: list[tuple[Member, Replica]] = []
    try:
        for m in ensemble.members:
            placed.append((m, m.acquire()))
    except NotReady:
        for m, replica in placed:
            await m.release(replica)
        raise
    sessions = [replica.client.session(timeout) for _, replica in placed]
    run = _Run(ensemble, request, sessions)
    measure = RequestMetrics(request.strategy, [m.spec.name for m in ensemble.members])
    rng = np.random.default_rng(request.seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = _StopMatcher(request.stop)
    finish = "length"
    try:
        opens = [run.guarded(i, s.open(request.prompt, request.request_id), request.first_step_timeout)
                 for i, s in enumerate(sessions)]  # fmt: skip
        prompt_tokens = [n or 0 for n in await asyncio.gather(*opens)]
        if not any(run.alive):
            raise WorkerLost("no model's worker could open the session")
        for usage, n in zip(run.usage.models, prompt_tokens, strict=True):
            usage.prompt_tokens = n
        measure.opened(prompt_tokens)
        for _ in range(request.max_new_tokens):
            step = _Step(run)
            try:
                decision = await strategy.step(step)
            except ContextExhausted:
                break
            run.usage.steps += 1
            run.usage.steps_ensembled += int(decision.ensembled)
            uid = choose(decision.dist, request.sampling, rng)
            measure.step(decision.ensembled, step.top_choices(), uid)
            if step.extras.union.is_end(uid):
                finish = "stop"
                break
            chosen = step.extras.bytes_of(uid)
            run.usage.completion_tokens += 1
            measure.token()
            run.unsent = [u + chosen for u in run.unsent]
            piece, stopped = stops.feed(decoder.decode(chosen))
            if piece:
                yield TextPiece(piece)
            if stopped:
                finish = "stop"
                break
        if not stops.stopped:
            tail, _ = stops.feed(decoder.decode(b"", final=True), final=True)
            if tail:
                yield TextPiece(tail)
        run.usage.elapsed_ms = (time.perf_counter() - started) * 1e3
        measure.finished(finish)
        usage = run.usage
        log.info(
            "request %s finished (%s): %d tokens, %d/%d steps ensembled, %.0f ms",
            request.request_id, finish, usage.completion_tokens, usage.steps_ensembled, usage.steps, usage.elapsed_ms,
            extra={"request_id": request.request_id, "finish_reason": finish, "strategy": request.strategy,
                   "completion_tokens": usage.completion_tokens, "steps": usage.steps,
                   "steps_ensembled": usage.steps_ensembled, "elapsed_ms": round(usage.elapsed_ms, 1)},
        )  # fmt: skip
        yield Finished(finish, stops.text, usage, request.request_id)
    finally:
        measure.close()
        for s in sessions:
            s.cancel()
        for m, replica in placed:
            await m.release(replica)


class _StopMatcher:
    """Finds stop strings in streamed text; holds back what could still become one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._text = ""
        self._sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text

    def feed(self, piece: str, final: bool = False) -> tuple[str, bool]:
        self._text += piece
        cut = min((i for i in (self._text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._text = self._text[:cut]
            out, self._sent = self._text[self._sent :], cut
            return out, True
        hold = 0 if final else self._holdback()
        end = len(self._text) - hold
        out, self._sent = self._text[self._sent : end], max(self._sent, end)
        return out, False

    def _holdback(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self._text)), best, -1):
                if self._text.endswith(stop[:k]):
                    best = k
                    break
        return best


async def generate_many(
    ensemble: Ensemble, requests: list[GenerationRequest], timeout: float | None = None
) -> AsyncIterator[tuple[int, TextPiece | Finished]]:
    """Generate every conversation of a batch concurrently; yield (index, event) as they come."""
    if len(requests) == 1:
        events = generate(ensemble, requests[0], timeout)
        try:
            async for event in events:
                yield 0, event
        finally:
            await events.aclose()
        return
    queue: asyncio.Queue[tuple[int, TextPiece | Finished] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, request: GenerationRequest) -> None:
        try:
            async for event in generate(ensemble, request, timeout):
                await queue.put((index, event))
        except Exception as exc:
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    finished = 0
    try:
        while finished < len(requests):
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item[1], Finished):
                finished += 1
            yield item
    finally:
        for task in tasks:
            task.cancel()
