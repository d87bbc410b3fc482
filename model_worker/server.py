"""The worker's gRPC server: Info, Vocabulary and one Session stream per request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, TypeVar

import grpc

from chorus.v1 import worker_pb2, worker_pb2_grpc
from chorus_common.errors import ContextFull
from chorus_common.security import TlsFiles
from chorus_common.serving import DRAINING_METADATA, FAILED_METADATA, GrpcServer
from chorus_common.worker_args import WorkerArgs
from model_worker import convert
from model_worker.errors import AtCapacity, RequestError, SessionExpired
from model_worker.kv_manager import OutOfBlocks

if TYPE_CHECKING:  # the runtime imports the modelling code: main.py imports it once the tokenizer is loaded
    from model_worker.runtime import Runtime, Session

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["ModelWorker"].full_name


class _ShuttingDown(Exception):
    pass


# Once the grace period is over, how long a session between messages is given for its client's next one.
BETWEEN_MESSAGES_S = 1.0
# How long health checks are still answered after sessions were ended by the grace period's end.
ENDED_SESSIONS_LINGER_S = 0.5


class WorkerService(worker_pb2_grpc.ModelWorkerServicer):
    def __init__(self) -> None:
        self.runtime: Runtime | None = None  # None while the model loads
        self.draining = False  # set on shutdown: new sessions get UNAVAILABLE
        self.stopping = asyncio.Event()  # set when the grace period is over: running sessions end
        self.running = 0  # Session streams in progress

    async def _runtime(self, context: grpc.aio.ServicerContext) -> Runtime:
        if self.runtime is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return self.runtime  # type: ignore[return-value]

    async def Info(self, request: worker_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> worker_pb2.ModelInfo:
        return convert.info_to_proto(await self._runtime(context))

    async def Vocabulary(
        self, request: worker_pb2.VocabularyRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.VocabularyChunk]:
        for chunk in convert.vocabulary_chunks(await self._runtime(context), request.chunk_size):
            yield chunk

    async def _unless_stopping(self, awaitable: Awaitable[T], settle: float = 0.0) -> T:
        """Await, unless the worker stops first (then the work is cancelled and _ShuttingDown raised). With
        `settle`, work pending when the worker stops gets that long more to complete, and _ShuttingDown is raised
        then, its result dropped: the point is when the stop is answered."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait((work, stop), return_when=asyncio.FIRST_COMPLETED)
            if settle and not work.done():
                await asyncio.wait((work,), timeout=settle)
        finally:
            stop.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled() or (settle and self.stopping.is_set()):
            raise _ShuttingDown
        return work.result()

    async def _handle(
        self, runtime: Runtime, session: Session | None, request: worker_pb2.SessionRequest
    ) -> tuple[worker_pb2.SessionResponse, Session | None]:
        """One message of a session stream: its response, and the session (opened by the first message)."""
        kind = request.WhichOneof("kind")
        if kind == "open":
            if session is not None:
                raise RequestError("open: the session is already open")
            prompt = convert.prompt_from_proto(request.open.prompt)
            session = await self._unless_stopping(runtime.open(prompt, request.open.request_id))
            return worker_pb2.SessionResponse(
                opened=worker_pb2.SessionOpened(prompt_tokens=session.prompt_tokens)
            ), session
        if kind is None:
            raise RequestError("request: empty message, expected open or step")
        if session is None:
            raise RequestError(f"{kind}: open the session first")
        if kind == "step":
            step = request.step
            call = runtime.step(session, step.append, convert.format_from_proto(step), step.rollback, step.partial)
            return convert.step_to_proto(await self._unless_stopping(call)), session
        if kind == "draft":
            d = request.draft
            sampling = convert.sampling_from_proto(d.sampling)
            call = runtime.draft(
                session, d.append, d.rollback, d.max_tokens, sampling, d.sampling.seed, d.report_top_k, d.partial
            )
            return convert.draft_to_proto(await self._unless_stopping(call)), session
        if kind == "score":
            sc = request.score
            top_k = sc.top_k or convert.DEFAULT_TOP_K
            call = runtime.score(session, sc.append, sc.rollback, list(sc.pieces), top_k, sc.partial)
            return convert.score_to_proto(await self._unless_stopping(call)), session
        return convert.lookup_to_proto(runtime.lookup(session, list(request.lookup.candidates))), session

    async def Session(
        self, request_iterator: AsyncIterator[worker_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.SessionResponse]:
        runtime = await self._runtime(context)
        session: Session | None = None
        self.running += 1
        requests = aiter(request_iterator)
        try:
            # A session between messages when the grace period ends is ended once its client's next one arrives
            # (a coordinator sends it within milliseconds), or BETWEEN_MESSAGES_S later: ended while its client may
            # be writing, gRPC's asyncio client can report its own INTERNAL ("Internal error from Core") in place
            # of the status and its draining mark (grpc/grpc#36066). A coordinator that reads it asks the health
            # service (answered for ENDED_SESSIONS_LINGER_S more), so the worker reads as draining, not lost.
            while (request := await self._unless_stopping(anext(requests, None), BETWEEN_MESSAGES_S)) is not None:
                if self.draining and session is None:
                    raise _ShuttingDown  # refused once its first message is read: the client sees this status
                try:
                    response, session = await self._handle(runtime, session, request)
                except ContextFull as exc:  # the session goes on: a rollback brings it back within its context
                    response = worker_pb2.SessionResponse(context_full=worker_pb2.ContextFull(details=str(exc)))
                yield response
        except _ShuttingDown:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the worker is shutting down; retry on another replica",
                trailing_metadata=DRAINING_METADATA,
            )
        except (AtCapacity, OutOfBlocks) as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except SessionExpired as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a bug or a model error: this request fails, the worker goes on serving
            log.exception("session of request %s failed", session.request_id if session else "?")
            failure = f"{runtime.loaded.name}: {type(exc).__name__}: {exc}"
            await context.abort(grpc.StatusCode.INTERNAL, failure, trailing_metadata=FAILED_METADATA)
        finally:
            self.running -= 1
            if session is not None:
                runtime.close(session)


class WorkerServer:
    """The worker's gRPC server. Health says NOT_SERVING until the model is loaded and while draining."""

    def __init__(self, address: str, session_ttl: float = WorkerArgs.session_ttl, tls: TlsFiles | None = None) -> None:
        self.session_ttl = session_ttl
        self._reaper: asyncio.Task[None] | None = None
        self.service = WorkerService()
        self.grpc = GrpcServer(
            address,
            SERVICE_NAME,
            lambda server: worker_pb2_grpc.add_ModelWorkerServicer_to_server(self.service, server),
            tls=tls,
        )
        self.port = self.grpc.port

    async def start(self) -> None:
        await self.grpc.start(serving=False)

    async def ready(self, runtime: Runtime) -> None:
        runtime.engine.start()
        self.service.runtime = runtime
        self._reaper = asyncio.get_running_loop().create_task(self._reap(runtime))
        await self.grpc.set_serving(True)
        log.info("worker %s serving on port %d", runtime.loaded.name, self.port)

    async def _reap(self, runtime: Runtime) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.session_ttl / 4))
            runtime.reap(self.session_ttl)

    async def stop(self, grace: float) -> None:
        """Drain: NOT_SERVING at once, new sessions refused, running ones get `grace` seconds to finish."""
        if self._reaper is not None:
            self._reaper.cancel()
        self.service.draining = True
        await self.grpc.set_serving(False)
        # Waiting here, not in grpc's stop(grace): that refuses every new call at once, health and
        # liveness checks included, so probes would fail instead of reading NOT_SERVING.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.service.running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        # Sessions still running when the grace period is over end with UNAVAILABLE "shutting down".
        ended = self.service.running
        self.service.stopping.set()
        deadline = loop.time() + 5.0
        while self.service.running and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if ended:
            # A client that read gRPC's own INTERNAL in place of that status (grpc/grpc#36066) asks the health
            # service why; stop() would refuse the question.
            await asyncio.sleep(ENDED_SESSIONS_LINGER_S)
        # A grace of a second, not 0: the sessions' final statuses ("shutting down") must reach their
        # clients before the connections close (cut, a client reads gRPC's own "Internal error from Core").
        await self.grpc.server.stop(1.0)
        if self.service.runtime is not None:
            await self.service.runtime.engine.stop()
