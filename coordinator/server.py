"""The coordinator's gRPC server. Stateless between requests: all state lives in the handler."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError, Message

from chorus.v1 import coordinator_pb2, coordinator_pb2_grpc
from chorus_common.security import TlsFiles, read_tokens
from chorus_common.serving import GrpcServer
from coordinator import convert
from coordinator.admission import Admission
from coordinator.ensemble import Ensemble
from coordinator.failures import RETRY_AFTER_S, answer, count_failure, model_label
from coordinator.running import run_requests

log = logging.getLogger(__name__)

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
# The wait a client should leave before retrying a refusal (at capacity, or a model with no ready
# worker), as trailing metadata: `retry-after` in seconds (what the chorus SDK reads, as HTTP's
# Retry-After), and gRPC's own `grpc-retry-pushback-ms` (what gRPC's retry policies read).
RETRY_AFTER = (("retry-after", str(RETRY_AFTER_S)), ("grpc-retry-pushback-ms", str(RETRY_AFTER_S * 1000)))


class Undecodable:
    """What the server gets for request bytes that do not parse (bad wire format, or a string field
    with invalid UTF-8): the handler answers INVALID_ARGUMENT, where gRPC's own handling says INTERNAL."""

    def __init__(self, kind: type[Message], error: DecodeError) -> None:
        self.message = (
            f"request: not a valid {kind.DESCRIPTOR.full_name} (bad protobuf, or a string field that is not "
            f"valid UTF-8): {error}"
        )


def _deserializer(kind: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def parse(data: bytes) -> Message | Undecodable:
        try:
            return kind.FromString(data)
        except DecodeError as exc:
            return Undecodable(kind, exc)

    return parse


def add_coordinator_to_server(service: CoordinatorService, server: grpc.aio.Server) -> None:
    """As the generated add_CoordinatorServicer_to_server, with requests that do not parse kept as Undecodable."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate,
            request_deserializer=_deserializer(coordinator_pb2.GenerateRequest),
            response_serializer=coordinator_pb2.GenerateResponse.SerializeToString,
        ),
        "Models": grpc.unary_unary_rpc_method_handler(
            service.Models,
            request_deserializer=_deserializer(coordinator_pb2.ModelsRequest),
            response_serializer=coordinator_pb2.ModelsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, ensemble: Ensemble, admission: Admission) -> None:
        self.ensemble = ensemble
        self.admission = admission

    async def Models(
        self, request: coordinator_pb2.ModelsRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ModelsResponse:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return convert.models_to_proto(self.ensemble)

    async def Generate(
        self, request: coordinator_pb2.GenerateRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        if isinstance(request, Undecodable):
            count_failure("invalid")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        model = model_label(request.model, self.ensemble.config.model_names)  # failures' model_name
        if not request.request_id:
            request.request_id = uuid.uuid4().hex[:16]
        events = None
        try:
            requests = convert.requests_from_proto(request, self.ensemble.config)
            timeout = context.time_remaining()  # passed on to the workers: deadlines do not propagate
            events = run_requests(self.ensemble, self.admission, requests, timeout)
            async for index, event in events:
                yield convert.event_to_proto(index, event)
        except BaseException as exc:  # also the client going away or its deadline passing (cancelled)
            time_remaining = context.time_remaining()
            count_failure(exc, time_remaining, model=model)
            failed = answer(exc, time_remaining)
            if failed.status.grpc is None:  # the call is gone, or a bug (UNKNOWN)
                raise
            await context.abort(failed.status.grpc, failed.details, RETRY_AFTER if failed.status.wait else ())
        finally:
            if events is not None:
                await events.aclose()


class CoordinatorServer:
    """The gRPC server. Health is SERVING exactly while every model has a ready worker and it is not draining."""

    def __init__(self, ensemble: Ensemble, address: str) -> None:
        self.ensemble = ensemble
        self.admission = Admission(ensemble.config.limits.max_running)
        self.service = CoordinatorService(ensemble, self.admission)
        settings = ensemble.config.server
        tls = None
        if settings.tls_cert and settings.tls_key:
            ca = Path(settings.client_ca) if settings.client_ca else None
            tls = TlsFiles(cert=Path(settings.tls_cert), key=Path(settings.tls_key), ca=ca)
        tokens = read_tokens(Path(settings.tokens_file)) if settings.tokens_file else ()
        self.grpc = GrpcServer(
            address,
            SERVICE_NAME,
            lambda server: add_coordinator_to_server(self.service, server),
            tls=tls,
            tokens=tokens,
            max_connection_age_s=settings.max_connection_age_s,
            max_connection_age_grace_s=settings.max_connection_age_grace_s,
        )
        self.port = self.grpc.port

    async def start(self) -> None:
        await self.grpc.start(serving=self._serving())
        loop = asyncio.get_running_loop()
        self.ensemble.listeners.append(lambda: loop.create_task(self.grpc.set_serving(self._serving())))
        log.info("coordinator serving on port %d", self.port)

    async def stop(self, grace: float) -> None:
        """Drain: NOT_SERVING at once, new calls refused, running ones get `grace` seconds to finish."""
        self.admission.draining = True
        await self.grpc.set_serving(False)
        # Waiting here, not in grpc's stop(grace): that cancelled running streams here early.
        deadline = asyncio.get_running_loop().time() + grace
        while self.admission.running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await self.grpc.server.stop(0)

    def _serving(self) -> bool:
        return self.ensemble.ready and not self.admission.draining
