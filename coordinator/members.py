"""One request's sessions on its members' workers: placement, keeping each session in sync with the
committed text (rollback of drafts, `partial` for text others wrote), liveness and timing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import TypeVar

import grpc
import numpy as np

from chorus_common.errors import ContextFull
from chorus_common.serving import DRAINING_KEY, FAILED_KEY
from chorus_common.types import DistributionPart, DraftResult, SamplingParams, ScoreResult
from coordinator import metrics, placement
from coordinator.ensemble import Ensemble, Member, NotReady, Replica
from coordinator.types import GenerationRequest, Usage
from coordinator.union_dist import UnionDist
from coordinator.workers import ModelSession, Transport

log = logging.getLogger(__name__)
T = TypeVar("T")
# Seconds a health check of a worker that is slow to answer a step may take before it counts as lost.
HEALTH_TIMEOUT = 2.0


class WorkerLost(Exception):
    """A member's worker died, hung or shut down, and the request's policy is 'fail' (or no model is left)."""


class WorkerDraining(WorkerLost):
    """A member's worker is shutting down (draining): it refused or ended the request's session. Not lost:
    it ends on purpose, and a retry may find another replica (Kubernetes discovery drops a terminating pod
    at once). Counted as worker_draining."""


class WorkerFailed(Exception):
    """A member's worker raised on this request (INTERNAL): the request fails, the worker serves on."""


# Codes that mean the worker itself is gone (died, restarted, shutting down), not that the request failed:
# INTERNAL among them is gRPC's own, for a connection broken under a call; the worker's own INTERNAL (an
# exception while serving the request) carries FAILED_KEY, and UNKNOWN is its handler raising.
_LOST_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}


class Members:
    """A request's session on one replica of each member. Every call that moves a session's text first
    syncs it with the committed text; a worker that is lost is left out (policy degrade) or fails the
    request (WorkerLost)."""

    def __init__(
        self,
        ensemble: Ensemble,
        request: GenerationRequest,
        placed: list[tuple[Member, Replica]],
        timeout: float | None,
        usage: Usage,
    ) -> None:
        self.ensemble = ensemble
        self.request = request
        self.placed = placed
        self.clients = [replica.client for _, replica in placed]
        self.timeout = timeout
        self.sessions: list[ModelSession] = [client.session(timeout) for client in self.clients]
        self.usage = usage
        self.text = bytearray()  # committed so far
        n = len(placed)
        # What each worker's session holds: text[:held_len[i]] + held_extra[i] (a draft or scored
        # pieces not, or not yet, accepted); the next call rolls back what differs from text.
        self.held_len = [0] * n
        self.held_extra = [b""] * n
        # Per model: every piece committed since its last sync was (also) written by it. Text written by
        # others is sent as `partial`: re-tokenized canonically by that model, its last token healed.
        self.authored = [True] * n
        self.alive = [True] * n
        self.slowest = [0.0] * n  # seconds, per model; 0 = no step answered yet

    @classmethod
    async def place(
        cls, ensemble: Ensemble, request: GenerationRequest, timeout: float | None, usage: Usage
    ) -> Members:
        """One replica of each member, and a session stream on each (timeout: the streams' deadline);
        NotReady, with nothing held, if a member has no ready replica."""
        placed: list[tuple[Member, Replica]] = []
        key = placement.prefix_key(request.prompt)
        try:
            for m in ensemble.members:
                placed.append((m, m.acquire(key)))
        except NotReady:
            for m, replica in placed:
                await m.release(replica)
            raise
        return cls(ensemble, request, placed, timeout, usage)

    async def close(self) -> None:
        """Cancel the session streams (each worker frees its slot) and hand the replicas back."""
        for s in self.sessions:
            s.cancel()
        for m, replica in self.placed:
            await m.release(replica)

    # --- opening and moving the text --------------------------------------------------------------

    async def open(self) -> list[int]:
        """Open every session on the request's prompt; each model's prompt tokens (0 for one lost)."""
        request = self.request
        opens = [
            self.guarded(i, self._open_on_a_live_replica(i), request.first_step_timeout)
            for i in range(len(self.sessions))
        ]
        prompt_tokens = [n or 0 for n in await asyncio.gather(*opens)]
        if not any(self.alive):
            raise WorkerLost("no model's worker could open the session")
        for usage, n in zip(self.usage.models, prompt_tokens, strict=True):
            usage.prompt_tokens = n
        return prompt_tokens

    async def _open_on_a_live_replica(self, i: int) -> int:
        """Open model i's session. A replica that is gone before it opened (shutting down in a rolling
        restart, killed, not yet known to have left) hands the session to another ready replica of the
        model: nothing ran there yet. With no other replica, one that joins within `replica_wait` seconds
        (a rolling restart's successor) takes it; past that, the error stands."""
        member = self.placed[i][0]
        tried: set[Replica] = set()
        while True:
            gone = self.clients[i].address
            try:
                return await self.sessions[i].open(self.request.prompt, self.request.request_id)
            except grpc.aio.AioRpcError as exc:
                if not _lost(exc):
                    raise
                tried.add(self.placed[i][1])
                key = placement.prefix_key(self.request.prompt)
                try:
                    replica = await self.ensemble.acquire(member, key, frozenset(tried), self.request.replica_wait)
                except NotReady:
                    raise exc from None
                why = f"{exc.code().name}: {exc.details()}"
            self.sessions[i].cancel()
            await member.release(self.placed[i][1])
            self.placed[i] = (member, replica)
            self.clients[i] = replica.client
            self.sessions[i] = replica.client.session(self.timeout)
            log.info(
                "request %s: replica %s of %s could not open the session (%s); trying %s",
                self.request.request_id,
                gone,
                member.spec.name,
                why,
                replica.client.address,
                extra={"request_id": self.request.request_id},
            )

    def commit(self, piece: bytes) -> None:
        self.text += piece

    def sync(self, i: int) -> tuple[int, bytes, bool]:
        """(bytes to roll back, bytes to append, whether others wrote them) that bring model i's session
        to the text."""
        ahead = bytes(self.text[self.held_len[i] :])
        extra = self.held_extra[i]
        same = _shared_prefix(extra, ahead)
        self.held_len[i], self.held_extra[i] = len(self.text), b""
        foreign, self.authored[i] = not self.authored[i], True
        return len(extra) - same, ahead[same:], foreign

    def written(
        self,
        drafted: bool,
        answers: Mapping[int, UnionDist],
        dist: UnionDist | None,
        uid: int,
        authors: Collection[int] = (),
    ) -> None:
        """Record who wrote this step's text. Pieces a strategy chose: the model that drew them, which holds
        them already, or the `authors`, whose own tokens they are (they take them as such; nobody else
        does). A drawn entry: each model whose own distribution gave it at least half the probability the
        decision gave it (a model alone, or ensembled with itself, always; one that was outvoted, or not
        asked, not)."""
        if drafted:
            self.authored = [mine and i in authors for i, mine in enumerate(self.authored)]
        if dist is None or uid < 0:
            return
        needed = 0.5 * _share(dist, uid)
        for i in range(len(self.authored)):
            mine = answers.get(i)
            self.authored[i] = self.authored[i] and mine is not None and _share(mine, uid) >= needed

    # --- the calls strategies make, through the step's view ---------------------------------------

    async def step(self, i: int, transport: Transport, partial: bool) -> list[DistributionPart] | None:
        """Model i's next-bytes distribution after the text; None if its worker was lost."""
        rollback, append, foreign = self.sync(i)
        started = time.perf_counter()
        call = self.sessions[i].step(append, transport, rollback, partial or foreign)
        step = await self.guarded(i, call, self.step_budget(i))
        if step is None:
            return None
        self.slowest[i] = max(self.slowest[i], time.perf_counter() - started)
        self.count(i, step.forward_passes, step.tokens_fed)
        if step.forward_passes:
            metrics.member_queued(self.request.model, self.ensemble.members[i].spec.name, step.queue_ms)
        return step.parts

    async def draft(
        self, i: int, max_tokens: int, sampling: SamplingParams, seed: int, report_top_k: int, ahead: bytes
    ) -> DraftResult | None:
        """Model i draws up to max_tokens tokens after the text and `ahead` (assumed to follow, not
        committed); None if its worker was lost, or if its context filled up with `ahead`."""
        rollback, append, foreign = self.sync(i)
        call = self.sessions[i].draft(
            append + ahead, rollback, max_tokens, sampling, seed, report_top_k, foreign or bool(ahead)
        )
        started = time.perf_counter()
        try:
            drafted = await self.guarded(i, call, self.step_budget(i) * (1 + max_tokens))
        except ContextFull:
            if not ahead:
                raise
            self.held_extra[i] = ahead  # it took the text assumed to follow, then found its context full
            return None  # nothing drafted ahead: the strategy goes on without
        if drafted is None:
            self.check_any_alive()
            return None
        per_token = (time.perf_counter() - started) / max(1, len(drafted.pieces))
        self.slowest[i] = max(self.slowest[i], per_token)
        self.count(i, drafted.forward_passes, drafted.tokens_fed)
        self.held_extra[i] = ahead + b"".join(drafted.pieces)
        return drafted

    async def score(self, i: int, pieces: list[bytes], top_k: int) -> ScoreResult | None:
        """Model i's distributions along `pieces` after the text, in one pass; None if its worker was lost."""
        rollback, append, foreign = self.sync(i)
        call = self.sessions[i].score(append, rollback, pieces, top_k, foreign)
        scored = await self.guarded(i, call, 2 * self.step_budget(i))
        if scored is None:
            return None
        self.count(i, scored.forward_passes, scored.tokens_fed)
        self.held_extra[i] = b"".join(pieces)
        return scored

    async def lookup(self, i: int, candidates: list[bytes]) -> np.ndarray | None:
        looked = await self.guarded(i, self.sessions[i].lookup(candidates), self.step_budget(i))
        self.check_any_alive()
        return looked

    async def each(self, models: Sequence[int], call: Callable[[int], Awaitable[T | None]]) -> dict[int, T]:
        """call(i) for every listed model still alive, concurrently; lost ones are left out."""
        alive = [i for i in models if self.alive[i]]
        results = await asyncio.gather(*(call(i) for i in alive))
        self.check_any_alive()
        return {i: r for i, r in zip(alive, results, strict=True) if r is not None}

    # --- liveness, timing and usage ---------------------------------------------------------------

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
        draining = False
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=budget)
                if done:
                    return task.result()
                waited += budget
                if not await self.clients[i].alive(timeout=HEALTH_TIMEOUT):
                    reason = f"no answer within {waited:.1f} s, and none to a health check"
                    break
                log.info(
                    "model %s is busy: no answer after %.1f s, but its worker is serving",
                    name,
                    waited,
                    extra={"request_id": self.request.request_id},
                )
        except grpc.aio.AioRpcError as exc:
            if _marked(exc, FAILED_KEY) or exc.code() == grpc.StatusCode.UNKNOWN:
                raise WorkerFailed(f"the worker of model {name!r} failed on this request: {exc.details()}") from exc
            if not _lost(exc):
                raise
            reason = f"{exc.code().name}: {exc.details()}"
            draining = _marked(exc, DRAINING_KEY) or await self.clients[i].draining(timeout=HEALTH_TIMEOUT)
        finally:
            if not task.done():
                task.cancel()
        self.sessions[i].cancel()
        if draining:
            failure = f"is shutting down (draining) and refused or ended this request's session ({reason})"
            return self.left_out(i, WorkerDraining(f"the worker of model {name!r} {failure}"), failure)
        return self.left_out(i, WorkerLost(f"the worker of model {name!r} was lost ({reason})"), f"was lost ({reason})")

    def left_out(self, i: int, failure: WorkerLost, why: str) -> None:
        """Model i's worker is gone for this request (why: what its worker did): fail the request (policy
        fail), or go on without the model."""
        if self.request.on_worker_loss != "degrade":
            raise failure
        name = self.ensemble.members[i].spec.name
        request_id = self.request.request_id
        log.warning(
            "request %s goes on without %s: its worker %s",
            request_id,
            name,
            why,
            extra={"request_id": request_id, "lost_model": name},
        )
        self.alive[i] = False
        self.usage.lost_models.append(name)
        return None


def _lost(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a call's error says the worker itself is gone (or going), not that the request failed there:
    a failure the worker reports is marked (chorus_common.serving); gRPC's own are not."""
    return exc.code() in _LOST_CODES and not _marked(exc, FAILED_KEY)


def _marked(exc: grpc.aio.AioRpcError, key: str) -> bool:
    """Whether a worker's status carries a mark of chorus_common.serving in its trailing metadata."""
    return any(k == key for k, _ in exc.trailing_metadata() or ())


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
