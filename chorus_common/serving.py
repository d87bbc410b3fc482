"""What every Chorus gRPC server has: message limits, keepalive, a maximum connection age, health
(with a liveness entry), reflection."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chorus_common.security import BearerAuth, TlsFiles

MAX_MESSAGE_BYTES = 256 << 20  # full distributions of 200k-token vocabularies travel between servers
MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Clients ping idle connections every 30 s (chorus.client.KEEPALIVE_OPTIONS): allow pings 10 s apart,
# with or without calls, so no client is sent GOAWAY "too_many_pings". The server pings too, to end
# the calls of clients that vanished without closing (their generations then stop).
KEEPALIVE_OPTIONS = [
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]
# After this long a connection is sent GOAWAY (gRPC adds +-10% jitter) and the client reconnects,
# re-resolving its target: long-lived clients spread over replicas that joined since, and a
# round_robin client picks up new addresses. Calls in flight go on; with a grace they are cut after it.
DEFAULT_MAX_CONNECTION_AGE_S = 300.0
_FOREVER_MS = 2**31 - 1  # gRPC's "infinite" for these options
LIVENESS = "liveness"  # SERVING while the process runs: what Kubernetes liveness probes ask
# Trailing metadata of a worker's UNAVAILABLE when it refuses or ends a session because it drains (shuts
# down): the coordinator tells that from a worker that was lost by this key, not by the status's words.
DRAINING_KEY = "chorus-draining"
DRAINING_METADATA = ((DRAINING_KEY, "1"),)
# Trailing metadata of a worker's INTERNAL when it raised while serving a request (and serves on). gRPC's
# own INTERNAL, for a connection broken under a call ("Internal error from Core"), has none: that
# worker is gone. A status's code and metadata tell the two apart, never its words.
FAILED_KEY = "chorus-failed"
FAILED_METADATA = ((FAILED_KEY, "1"),)


class GrpcServer:
    def __init__(
        self,
        address: str,
        service_name: str,
        register: Callable[[grpc.aio.Server], None],
        tls: TlsFiles | None = None,
        tokens: Sequence[str] = (),
        max_connection_age_s: float | None = DEFAULT_MAX_CONNECTION_AGE_S,
        max_connection_age_grace_s: float | None = None,
    ) -> None:
        """`max_connection_age_s`: None = connections live as long as the client keeps them;
        `max_connection_age_grace_s`: how long calls in flight may go on after that, None = to their end."""
        self.service_name = service_name
        interceptors = [BearerAuth(tokens)] if tokens else []
        self.options = [
            *MESSAGE_OPTIONS,
            *KEEPALIVE_OPTIONS,
            *connection_age_options(max_connection_age_s, max_connection_age_grace_s),
        ]
        self.server = grpc.aio.server(options=self.options, interceptors=interceptors)
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


def connection_age_options(age_s: float | None, grace_s: float | None) -> list[tuple[str, int]]:
    for name, value in (("max_connection_age_s", age_s), ("max_connection_age_grace_s", grace_s)):
        if value is not None and not 0 < value < _FOREVER_MS / 1000:
            raise ValueError(f"{name} must be a positive number of seconds or None (got {value!r})")
    if age_s is None:
        return []
    grace_ms = _FOREVER_MS if grace_s is None else max(1, round(grace_s * 1000))
    return [("grpc.max_connection_age_ms", max(1, round(age_s * 1000))), ("grpc.max_connection_age_grace_ms", grace_ms)]
