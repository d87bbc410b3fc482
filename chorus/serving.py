"""What every Chorus gRPC server has: message limits, health (with a liveness entry), reflection."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chorus.security import BearerAuth, TlsFiles

MAX_MESSAGE_BYTES = 256 << 20  # full distributions of 200k-token vocabularies travel between servers
MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
LIVENESS = "liveness"  # SERVING while the process runs: what Kubernetes liveness probes ask


class GrpcServer:
    def __init__(
        self,
        address: str,
        service_name: str,
        register: Callable[[grpc.aio.Server], None],
        tls: TlsFiles | None = None,
        tokens: Sequence[str] = (),
    ) -> None:
        self.service_name = service_name
        interceptors = [BearerAuth(tokens)] if tokens else []
        self.server = grpc.aio.server(options=MESSAGE_OPTIONS, interceptors=interceptors)
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, tls.server_credentials())

    async def start(self, serving: bool) -> None:
        await self.server.start()
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.set_serving(serving)

    async def set_serving(self, serving: bool) -> None:
        """Readiness: the overall health ("") and the service's own entry."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", self.service_name):
            await self.health.set(name, status)
