"""The worker's gRPC server: Info, Vocabulary and one Session stream per request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from chorus.security import TlsFiles
from chorus.serving import GrpcServer
from chorus.v1 import worker_pb2, worker_pb2_grpc
from model_worker import convert
from model_worker.runtime import AtCapacity, ContextFull, RequestError, Runtime, Session, SessionExpired

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["ModelWorker"].full_name


class WorkerService(worker_pb2_grpc.ModelWorkerServicer):
    def __init__(self) -> None:
        self.runtime: Runtime | None = None  # None while the model loads
        self.draining = False  # set on shutdown: new sessions get UNAVAILABLE
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

    async def Session(
        self, request_iterator: AsyncIterator[worker_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.SessionResponse]:
        runtime = await self._runtime(context)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is shutting down")
        session: Session | None = None
        self.running += 1
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        raise RequestError("open: the session is already open")
                    prompt = convert.prompt_from_proto(request.open.prompt)
                    session = runtime.open(prompt, request.open.request_id)
                    yield worker_pb2.SessionResponse(
                        opened=worker_pb2.SessionOpened(prompt_tokens=session.prompt_tokens)
                    )
                elif kind is not None and session is None:
                    raise RequestError(f"{kind}: open the session first")
                elif kind == "step":
                    step = request.step
                    out = await runtime.step(session, step.append, convert.format_from_proto(step), step.rollback)
                    yield convert.step_to_proto(out)
                elif kind == "draft":
                    d = request.draft
                    sampling = convert.sampling_from_proto(d.sampling)
                    drafted = await runtime.draft(
                        session, d.append, d.rollback, d.max_tokens, sampling, d.sampling.seed, d.report_top_k
                    )
                    yield convert.draft_to_proto(drafted)
                elif kind == "score":
                    sc = request.score
                    top_k = sc.top_k or convert.DEFAULT_TOP_K
                    scored = await runtime.score(session, sc.append, sc.rollback, list(sc.pieces), top_k)
                    yield convert.score_to_proto(scored)
                elif kind == "lookup":
                    yield convert.lookup_to_proto(runtime.lookup(session, list(request.lookup.candidates)))
                else:
                    raise RequestError("request: empty message, expected open or step")
        except ContextFull as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
        except AtCapacity as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except SessionExpired as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            self.running -= 1
            if session is not None:
                runtime.close(session)


class WorkerServer:
    """The worker's gRPC server. Health says NOT_SERVING until the model is loaded and while draining."""

    def __init__(self, address: str, session_ttl: float = 600.0, tls: TlsFiles | None = None) -> None:
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
        runtime.batcher.start()
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
        await self.grpc.server.stop(0)
        if self.service.runtime is not None:
            await self.service.runtime.batcher.stop()
