"""The worker's gRPC server: Info, Vocabulary and one Session stream per request."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chorus.v1 import worker_pb2, worker_pb2_grpc
from model_worker import convert
from model_worker.runtime import ContextFull, RequestError, Runtime, Session

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 << 20  # full distributions of 200k-token vocabularies travel here
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["ModelWorker"].full_name


class WorkerService(worker_pb2_grpc.ModelWorkerServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def Info(self, request: worker_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> worker_pb2.ModelInfo:
        return convert.info_to_proto(self.runtime)

    async def Vocabulary(
        self, request: worker_pb2.VocabularyRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.VocabularyChunk]:
        for chunk in convert.vocabulary_chunks(self.runtime, request.chunk_size):
            yield chunk

    async def Session(
        self, request_iterator: AsyncIterator[worker_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.SessionResponse]:
        session: Session | None = None
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        raise RequestError("open: the session is already open")
                    prompt = convert.prompt_from_proto(request.open.prompt)
                    session = self.runtime.open(prompt, request.open.request_id)
                    yield worker_pb2.SessionResponse(
                        opened=worker_pb2.SessionOpened(prompt_tokens=session.prompt_tokens)
                    )
                elif kind == "step":
                    if session is None:
                        raise RequestError("step: open the session first")
                    fmt = convert.format_from_proto(request.step)
                    out = await self.runtime.step(session, request.step.append, fmt)
                    yield convert.step_to_proto(out)
                else:
                    raise RequestError("request: empty message, expected open or step")
        except ContextFull as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            if session is not None:
                self.runtime.close(session)


async def serve(runtime: Runtime, address: str) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start the worker on address ('host:port', port 0 = any free port)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    worker_pb2_grpc.add_ModelWorkerServicer_to_server(WorkerService(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    runtime.batcher.start()
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("worker %s serving on port %d", runtime.loaded.name, port)
    return server, port, health_servicer
