"""One conversation's generation loop: the coordinator owns the text and decides each step.

Each step the strategy decides (through its view of the step, `_Step`), the loop applies the decision
(draws the next entry, commits the pieces, streams their text) and counts usage. The members' sessions
(members.py) and the stopping rules (stopping.py) live in their own modules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np

from chorus_common.errors import ContextFull
from chorus_common.types import DistributionPart
from coordinator.ensemble import Ensemble
from coordinator.logprobs import token_logprob
from coordinator.members import Members
from coordinator.metrics import RequestMetrics
from coordinator.stopping import Stopping
from coordinator.strategies import STRATEGIES, Decision, Drafted
from coordinator.types import Finished, GenerationRequest, ModelUsage, TextPiece, TokenLogprob, Usage
from coordinator.union_dist import ExtraIds, UnionDist, choose, from_parts, mix, tempered
from coordinator.union_vocab import END
from coordinator.workers import Transport

log = logging.getLogger(__name__)


class _Step:
    """The StepContext strategies see: the request's settings, and their calls passed on to the members'
    sessions, with the answers mapped into the union."""

    def __init__(
        self, members: Members, request: GenerationRequest, extras: ExtraIds, remaining: int, rng: np.random.Generator
    ) -> None:
        ensemble = members.ensemble
        assert ensemble.union is not None  # checked ready before the first step
        self._members = members
        self.extras = extras
        self.config = ensemble.config
        self.union = ensemble.union
        self.n_models = len(ensemble.members)
        self.weights = list(request.weights) or [m.weight for m in ensemble.members]
        self.primary = ensemble.primary
        self.threshold = request.threshold
        self.sampling = request.sampling
        self.rng = rng
        self.remaining = remaining
        self.alive = members.alive
        self.answers: dict[int, UnionDist] = {}  # model index -> its distribution this step
        self.temperatures = [m.spec.temperature for m in ensemble.members]
        self._log_shift = [0.0] * self.n_models  # per model: log of the last tempered answer's renormaliser

    @property
    def text(self) -> bytes:
        return bytes(self._members.text)  # copied only for the strategies that read it

    async def ask(self, models: Sequence[int], top_k: int | None = None, partial: bool = False) -> dict[int, UnionDist]:
        transport = self._members.ensemble.transport
        if top_k is not None:
            transport = Transport(top_k=top_k, half=transport.half)
        answers = await self._members.each(models, lambda i: self._ask_one(i, transport, partial))
        self.answers.update(answers)
        return answers

    def top_choices(self) -> dict[int, int]:
        return {i: d.top() for i, d in self.answers.items() if d.uids.size}

    async def _ask_one(self, i: int, transport: Transport, partial: bool) -> UnionDist | None:
        parts = await self._members.step(i, transport, partial)
        return None if parts is None else self._dist(i, parts)

    async def draft(
        self, model: int, max_tokens: int, report_top_k: int = 0, after: Sequence[bytes] = ()
    ) -> Drafted | None:
        if not self._members.alive[model]:
            return None
        ahead = b"".join(after)  # speculative: text assumed to follow what is committed
        seed = int(self.rng.integers(2**63))
        sampling = self.sampling
        if sampling.temperature > 0 and self.temperatures[model] != 1.0:  # the worker draws from the tempered model
            sampling = replace(sampling, temperature=sampling.temperature * self.temperatures[model])
        drafted = await self._members.draft(model, max_tokens, sampling, seed, report_top_k, ahead)
        if drafted is None:
            return None
        return Drafted(drafted.pieces, drafted.ended, [self._dist(model, parts) for parts in drafted.dists])

    async def score(self, models: Sequence[int], pieces: list[bytes], top_k: int) -> dict[int, list[UnionDist | None]]:
        return await self._members.each(models, lambda i: self._score_one(i, pieces, top_k))

    async def _score_one(self, i: int, pieces: list[bytes], top_k: int) -> list[UnionDist | None] | None:
        scored = await self._members.score(i, pieces, top_k)
        if scored is None:
            return None
        return [None if parts is None else self._dist(i, parts) for parts in scored.positions]

    async def lookup(self, model: int, candidates: list[bytes]) -> np.ndarray | None:
        if not self._members.alive[model]:
            return None
        looked = await self._members.lookup(model, candidates)
        temperature = self.temperatures[model]
        if looked is None or temperature == 1.0:
            return looked
        return looked / temperature + self._log_shift[model]  # on the scale of the tempered answer

    def _dist(self, i: int, parts: Sequence[DistributionPart]) -> UnionDist:
        """Model i's answer in the union, tempered by its configured temperature: every distribution a
        strategy gets from a member (asked, drafted, scored) comes through here."""
        member = self._members.ensemble.members[i]
        assert member.vocab is not None  # checked ready before the first step
        dist = from_parts(parts, member.index, member.vocab.tokens, self.extras)
        if self.temperatures[i] == 1.0:
            return dist
        dist, self._log_shift[i] = tempered(dist, self.temperatures[i])
        return dist

    def mix(self, answers: Mapping[int, UnionDist]) -> UnionDist:
        weights = np.array([self.weights[i] for i in answers])
        return mix(list(answers.values()), weights / weights.sum(), self.extras.size)

    def uid(self, data: bytes) -> int:
        return END if not data else self.extras.uid(data)

    def bytes_of(self, uid: int) -> bytes:
        return self.extras.bytes_of(uid)


class _Conversation:
    """What the loop applies each decision to: the drawn entries, the committed text, its stopping rules,
    the usage and metrics."""

    def __init__(self, request: GenerationRequest, members: Members, measure: RequestMetrics) -> None:
        assert members.ensemble.union is not None  # checked ready before the run
        self.request = request
        self.members = members
        self.usage = members.usage
        self.measure = measure
        self.extras = ExtraIds(members.ensemble.union)
        self.rng = np.random.default_rng(request.seed)
        self.stopping = Stopping(request.stop, request.max_new_tokens)
        self.unsent: list[TokenLogprob] = []  # with request.logprobs: tokens whose text no piece carried yet

    def step_view(self) -> _Step:
        remaining = self.stopping.room(self.usage.completion_tokens)
        return _Step(self.members, self.request, self.extras, remaining, self.rng)

    def decide(self, decision: Decision, step: _Step, strategy: str) -> tuple[list[bytes], bool]:
        """(the pieces the decision chose, whether the sequence ends after them): its own pieces, then an
        entry drawn from its distribution."""
        request, usage, measure = self.request, self.usage, self.measure
        chosen = list(decision.pieces)
        end = decision.end
        if not (chosen or end or decision.dist is not None):
            raise RuntimeError(f"strategy {strategy!r} decided nothing")
        for _piece in chosen:
            measure.step(False, {}, -1)
        uid = -1
        if decision.dist is not None and not end:
            uid = choose(decision.dist, request.sampling, self.rng)
            measure.step(decision.ensembled, step.top_choices(), uid)
            usage.steps_ensembled += int(decision.ensembled)
            if self.extras.union.is_end(uid):
                end = True
            else:
                chosen.append(self.extras.bytes_of(uid))
                if request.logprobs is not None:  # strategies that draft pieces are refused logprobs
                    top = request.logprobs
                    self.unsent.append(token_logprob(decision.dist, request.sampling, uid, top, self.extras))
        self.members.written(bool(decision.pieces), step.answers, decision.dist, uid, decision.authors)
        return chosen, end

    def commit(self, chosen: list[bytes], end: bool) -> Iterator[TextPiece]:
        """Commit the chosen pieces (as many as the token budget allows) and yield their text as it may be
        sent; a stop string, or the end, finishes the conversation."""
        usage = self.usage
        for piece in chosen[: self.stopping.room(usage.completion_tokens)]:
            usage.steps += 1
            usage.completion_tokens += 1
            self.measure.token()
            self.members.commit(piece)
            text, stopped = self.stopping.feed(piece)
            if text or (stopped and self.unsent):
                yield self._piece(text)
            if stopped:
                break
        if end and self.stopping.finish == "length":
            usage.steps += 1
            self.stopping.end()

    def flush(self) -> Iterator[TextPiece]:
        """The text held back, and logprobs not sent yet, at the end."""
        tail = self.stopping.flush()
        if tail or self.unsent:
            yield self._piece(tail)

    def _piece(self, text: str) -> TextPiece:
        piece = TextPiece(text, tuple(self.unsent))
        self.unsent.clear()
        return piece


async def generate(
    ensemble: Ensemble, request: GenerationRequest, timeout: float | None = None
) -> AsyncIterator[TextPiece | Finished]:
    """Yield text pieces, then one Finished. Closing the iterator cancels the workers' sessions."""
    started = time.perf_counter()
    strategy = STRATEGIES[request.strategy]()
    ensemble.check_ready()
    if request.model is not None:  # a member alone: placed on that member only
        ensemble = ensemble.alone(request.model)
    usage = Usage(models=[ModelUsage(m.spec.name) for m in ensemble.members])
    members = await Members.place(ensemble, request, timeout, usage)
    measure = RequestMetrics(request.strategy, [m.spec.name for m in ensemble.members], request.model)
    conversation = _Conversation(request, members, measure)
    stopping = conversation.stopping
    try:
        measure.opened(await members.open())
        while not stopping.done(usage.completion_tokens):
            step = conversation.step_view()
            try:
                decision = await strategy.step(step)
            except ContextFull:
                break
            chosen, end = conversation.decide(decision, step, strategy.name)
            for piece in conversation.commit(chosen, end):
                yield piece
        for piece in conversation.flush():
            yield piece
        usage.elapsed_ms = (time.perf_counter() - started) * 1e3
        finish = stopping.finish
        measure.finished(finish)
        log.info(
            "request %s finished (%s): %d tokens, %d/%d steps ensembled, %.0f ms",
            request.request_id,
            finish,
            usage.completion_tokens,
            usage.steps_ensembled,
            usage.steps,
            usage.elapsed_ms,
            extra={
                "request_id": request.request_id,
                "finish_reason": finish,
                "strategy": request.strategy,
                "completion_tokens": usage.completion_tokens,
                "steps": usage.steps,
                "steps_ensembled": usage.steps_ensembled,
                "elapsed_ms": round(usage.elapsed_ms, 1),
            },
        )
        yield Finished(finish, stopping.text, usage, request.request_id)
    finally:
        await strategy.close()
        measure.close()
        await members.close()


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
