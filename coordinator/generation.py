"""One conversation's generation loop: the coordinator owns the text and decides each step."""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import grpc
import numpy as np

from chorus_common.types import DistributionPart
from coordinator.ensemble import Ensemble, Member, NotReady, Replica
from coordinator.logprobs import token_logprob
from coordinator.metrics import RequestMetrics
from coordinator.strategies import STRATEGIES, Drafted
from coordinator.types import Finished, GenerationRequest, ModelUsage, TextPiece, TokenLogprob, Usage
from coordinator.union_dist import ExtraIds, UnionDist, choose, from_parts, mix
from coordinator.union_vocab import END
from coordinator.workers import ContextFull, ModelSession, Transport, WorkerClient

log = logging.getLogger(__name__)
T = TypeVar("T")
# Seconds a health check of a worker that is slow to answer a step may take before it counts as lost.
HEALTH_TIMEOUT = 2.0


class ContextExhausted(Exception):
    """A member's context is full: the generation ends with finish reason 'length'."""


class WorkerLost(Exception):
    """A member's worker died, hung or shut down, and the request's policy is 'fail' (or no model is left)."""


class WorkerFailed(Exception):
    """A member's worker raised on this request (INTERNAL): the request fails, the worker serves on."""


# Codes that mean the worker itself is gone (died, restarted, shutting down), not that the request failed.
_LOST_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
# Codes of a worker that answered with an error of its own (an exception while serving the request).
_FAILED_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# What gRPC itself reports, as INTERNAL, when a connection breaks under a call: the worker is gone.
_TRANSPORT_INTERNAL = "Internal error from Core"


class _Step:
    """The StepContext strategies see; sends each model the text it has not seen yet."""

    def __init__(self, run: _Run, rng: np.random.Generator) -> None:
        self._run = run
        assert run.ensemble.union is not None  # checked ready before the first step
        self.extras = run.extras
        self.config = run.ensemble.config
        self.union = run.ensemble.union
        self.n_models = len(run.ensemble.members)
        self.weights = list(run.request.weights) or [m.weight for m in run.ensemble.members]
        self.primary = run.ensemble.primary
        self.threshold = run.request.threshold
        self.sampling = run.request.sampling
        self.rng = rng
        self.remaining = run.request.max_new_tokens - run.usage.completion_tokens
        self.alive = run.alive
        self.answers: dict[int, UnionDist] = {}  # model index -> its distribution this step

    @property
    def text(self) -> bytes:
        return bytes(self._run.text)  # copied only for the strategies that read it

    async def ask(self, models: Sequence[int], top_k: int | None = None, partial: bool = False) -> dict[int, UnionDist]:
        transport = self._run.ensemble.transport
        if top_k is not None:
            transport = Transport(top_k=top_k, half=transport.half)
        answers = await self._each(models, lambda i: self._ask_one(i, transport, partial))
        self.answers.update(answers)
        return answers

    def top_choices(self) -> dict[int, int]:
        return {i: d.top() for i, d in self.answers.items() if d.uids.size}

    async def _ask_one(self, i: int, transport: Transport, partial: bool) -> UnionDist | None:
        run = self._run
        rollback, append, foreign = run.sync(i)
        started = time.perf_counter()
        call = run.sessions[i].step(append, transport, rollback, partial or foreign)
        step = await run.guarded(i, call, run.step_budget(i))
        if step is None:
            return None
        run.slowest[i] = max(run.slowest[i], time.perf_counter() - started)
        run.count(i, step.forward_passes, step.tokens_fed)
        return self._dist(i, step.parts)

    async def draft(
        self, model: int, max_tokens: int, report_top_k: int = 0, after: Sequence[bytes] = ()
    ) -> Drafted | None:
        run = self._run
        if not run.alive[model]:
            return None
        rollback, append, foreign = run.sync(model)
        ahead = b"".join(after)  # speculative: text assumed to follow what is committed
        seed = int(self.rng.integers(2**63))
        call = run.sessions[model].draft(append + ahead, rollback, max_tokens, self.sampling, seed, report_top_k,
                                         foreign or bool(ahead))  # fmt: skip
        started = time.perf_counter()
        try:
            drafted = await run.guarded(model, call, run.step_budget(model) * (1 + max_tokens))
        except ContextExhausted:
            if not ahead:
                raise
            run.held_extra[model] = ahead  # it took the text assumed to follow, then found its context full
            return None  # nothing drafted ahead: the strategy goes on without
        if drafted is None:
            run.check_any_alive()
            return None
        per_token = (time.perf_counter() - started) / max(1, len(drafted.pieces))
        run.slowest[model] = max(run.slowest[model], per_token)
        run.count(model, drafted.forward_passes, drafted.tokens_fed)
        run.held_extra[model] = ahead + b"".join(drafted.pieces)
        return Drafted(drafted.pieces, drafted.ended, [self._dist(model, parts) for parts in drafted.dists])

    async def score(self, models: Sequence[int], pieces: list[bytes], top_k: int) -> dict[int, list[UnionDist | None]]:
        return await self._each(models, lambda i: self._score_one(i, pieces, top_k))

    async def _score_one(self, i: int, pieces: list[bytes], top_k: int) -> list[UnionDist | None] | None:
        run = self._run
        rollback, append, foreign = run.sync(i)
        call = run.sessions[i].score(append, rollback, pieces, top_k, foreign)
        scored = await run.guarded(i, call, 2 * run.step_budget(i))
        if scored is None:
            return None
        run.count(i, scored.forward_passes, scored.tokens_fed)
        run.held_extra[i] = b"".join(pieces)
        return [None if parts is None else self._dist(i, parts) for parts in scored.positions]

    async def lookup(self, model: int, candidates: list[bytes]) -> np.ndarray | None:
        run = self._run
        if not run.alive[model]:
            return None
        looked = await run.guarded(model, run.sessions[model].lookup(candidates), run.step_budget(model))
        run.check_any_alive()
        return looked

    async def _each(self, models: Sequence[int], call: Callable[[int], Awaitable[T | None]]) -> dict[int, T]:
        """call(i) for every listed model still alive, concurrently; lost ones are left out."""
        alive = [i for i in models if self._run.alive[i]]
        results = await asyncio.gather(*(call(i) for i in alive))
        self._run.check_any_alive()
        return {i: r for i, r in zip(alive, results, strict=True) if r is not None}

    def _dist(self, i: int, parts: Sequence[DistributionPart]) -> UnionDist:
        member = self._run.ensemble.members[i]
        assert member.vocab is not None  # checked ready before the first step
        return from_parts(parts, member.index, member.vocab.tokens, self.extras)

    def mix(self, answers: Mapping[int, UnionDist]) -> UnionDist:
        weights = np.array([self.weights[i] for i in answers])
        return mix(list(answers.values()), weights / weights.sum(), self.extras.size)

    def uid(self, data: bytes) -> int:
        return END if not data else self.extras.uid(data)

    def bytes_of(self, uid: int) -> bytes:
        return self.extras.bytes_of(uid)


class _Run:
    def __init__(
        self, ensemble: Ensemble, request: GenerationRequest, sessions: list[ModelSession], clients: list[WorkerClient]
    ) -> None:
        self.ensemble = ensemble
        self.request = request
        self.sessions = sessions
        self.clients = clients
        assert ensemble.union is not None  # checked ready before the run
        self.extras = ExtraIds(ensemble.union)
        self.text = bytearray()  # generated so far
        # What each worker's session holds: text[:held_len[i]] + held_extra[i] (a draft or scored
        # pieces not, or not yet, accepted); the next call rolls back what differs from text.
        self.held_len = [0] * len(sessions)
        self.held_extra = [b""] * len(sessions)
        # Per model: every piece committed since its last sync was (also) written by it. Text written by
        # others is sent as `partial`: re-tokenized canonically by that model, its last token healed.
        self.authored = [True] * len(sessions)
        self.usage = Usage(models=[ModelUsage(m.spec.name) for m in ensemble.members])
        self.alive = [True] * len(sessions)
        self.slowest = [0.0] * len(sessions)  # seconds, per model; 0 = no step answered yet

    def sync(self, i: int) -> tuple[int, bytes, bool]:
        """(bytes to roll back, bytes to append, whether others wrote them) that bring model i's session
        to the text."""
        ahead = bytes(self.text[self.held_len[i] :])
        extra = self.held_extra[i]
        same = _shared_prefix(extra, ahead)
        self.held_len[i], self.held_extra[i] = len(self.text), b""
        foreign, self.authored[i] = not self.authored[i], True
        return len(extra) - same, ahead[same:], foreign

    def written(self, drafted: bool, answers: Mapping[int, UnionDist], dist: UnionDist | None, uid: int) -> None:
        """Record who wrote this step's text. Drafted pieces: the model that drew them, which holds them
        already. A drawn entry: each model whose own distribution gave it at least half the probability
        the decision gave it (a model alone, or ensembled with itself, always; one that was outvoted, or
        not asked, not)."""
        if drafted:
            self.authored = [False] * len(self.authored)
        if dist is None or uid < 0:
            return
        needed = 0.5 * _share(dist, uid)
        for i in range(len(self.authored)):
            mine = answers.get(i)
            self.authored[i] = self.authored[i] and mine is not None and _share(mine, uid) >= needed

    def check_any_alive(self) -> None:
        if not any(self.alive):
            raise WorkerLost(f"every model's worker was lost: {', '.join(self.usage.lost_models)}")

    def count(self, i: int, forward_passes: int, tokens_fed: int) -> None:
        usage = self.usage.models[i]
        usage.forward_passes += forward_passes
        usage.tokens_fed += tokens_fed

    def step_budget(self, i: int) -> float:
        """How long model i may take before its worker's health is checked: long for its first step (the
        prefill), short after."""
        if self.slowest[i] == 0.0:
            return self.request.first_step_timeout
        return max(self.request.step_timeout, 4 * self.slowest[i])

    async def guarded(self, i: int, call: Awaitable[T], budget: float) -> T | None:
        """Run a call to model i's worker; None if the worker was lost and the policy is degrade.
        Past the budget the worker's liveness is checked: one that answers is busy (its queue, or other
        sessions' prefills), not lost, and is waited for; one that does not answer is lost. The request's
        own deadline still bounds the wait."""
        name = self.ensemble.members[i].spec.name
        task = asyncio.ensure_future(call)
        waited = 0.0
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=budget)
                if done:
                    return task.result()
                waited += budget
                if not await self.clients[i].alive(timeout=HEALTH_TIMEOUT):
                    reason = f"no answer within {waited:.1f} s, and none to a health check"
                    break
                log.info("model %s is busy: no answer after %.1f s, but its worker is serving", name, waited,
                         extra={"request_id": self.request.request_id})  # fmt: skip
        except ContextFull as exc:
            raise ContextExhausted(str(exc)) from exc
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _FAILED_CODES and exc.details() != _TRANSPORT_INTERNAL:
                raise WorkerFailed(f"the worker of model {name!r} failed on this request: {exc.details()}") from exc
            if exc.code() not in _LOST_CODES and exc.details() != _TRANSPORT_INTERNAL:
                raise
            reason = f"{exc.code().name}: {exc.details()}"
        finally:
            if not task.done():
                task.cancel()
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
    if request.model is not None:  # a member alone: placed on that member only
        ensemble = ensemble.alone(request.model)
    placed: list[tuple[Member, Replica]] = []
    try:
        for m in ensemble.members:
            placed.append((m, m.acquire()))
    except NotReady:
        for m, replica in placed:
            await m.release(replica)
        raise
    sessions = [replica.client.session(timeout) for _, replica in placed]
    run = _Run(ensemble, request, sessions, [replica.client for _, replica in placed])
    measure = RequestMetrics(request.strategy, [m.spec.name for m in ensemble.members], request.model)
    rng = np.random.default_rng(request.seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = _StopMatcher(request.stop)
    unsent: list[TokenLogprob] = []  # with request.logprobs: tokens whose text no piece carried yet
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
        while run.usage.completion_tokens < request.max_new_tokens and finish == "length":
            step = _Step(run, rng)
            try:
                decision = await strategy.step(step)
            except ContextExhausted:
                break
            chosen = list(decision.pieces)
            end = decision.end
            if not (chosen or end or decision.dist is not None):
                raise RuntimeError(f"strategy {strategy.name!r} decided nothing")
            for _piece in chosen:
                measure.step(False, {}, -1)
            uid = -1
            if decision.dist is not None and not end:
                uid = choose(decision.dist, request.sampling, rng)
                measure.step(decision.ensembled, step.top_choices(), uid)
                run.usage.steps_ensembled += int(decision.ensembled)
                if step.extras.union.is_end(uid):
                    end = True
                else:
                    chosen.append(step.extras.bytes_of(uid))
                    if request.logprobs is not None:  # strategies that draft pieces are refused logprobs
                        dist, top = decision.dist, request.logprobs
                        unsent.append(token_logprob(dist, request.sampling, uid, top, step.extras))
            run.written(bool(decision.pieces), step.answers, decision.dist, uid)
            for piece in chosen[: request.max_new_tokens - run.usage.completion_tokens]:
                run.usage.steps += 1
                run.usage.completion_tokens += 1
                measure.token()
                run.text += piece
                text, stopped = stops.feed(decoder.decode(piece))
                if text or (stopped and unsent):
                    yield TextPiece(text, tuple(unsent))
                    unsent.clear()
                if stopped:
                    finish = "stop"
                    break
            if end and finish == "length":
                run.usage.steps += 1
                finish = "stop"
        if not stops.stopped:
            tail, _ = stops.feed(decoder.decode(b"", final=True), final=True)
            if tail or unsent:
                yield TextPiece(tail, tuple(unsent))
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
        await strategy.close()
        measure.close()
        for s in sessions:
            s.cancel()
        for m, replica in placed:
            await m.release(replica)


def _share(dist: UnionDist, uid: int) -> float:
    """The probability dist gives uid, normalised."""
    at = int(np.searchsorted(dist.uids, uid))
    if at >= dist.uids.size or dist.uids[at] != uid:
        return 0.0
    return float(dist.probs[at] / dist.probs.sum())


def _shared_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(k for k in range(n) if a[k] != b[k])


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
