"""TLS material and bearer-token authentication for Chorus servers and clients."""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# Kubernetes probes and tooling call these without a token.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files. With `ca` on a server, clients must present a certificate it signed (mutual TLS)."""

    cert: Path
    key: Path
    ca: Path | None = None
    server_name: str | None = None  # as a client: the name the server's certificate must carry

    def server_credentials(self) -> grpc.ServerCredentials:
        pair = [(self.key.read_bytes(), self.cert.read_bytes())]
        ca = self.ca.read_bytes() if self.ca else None
        return grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=ca is not None)

    def ssl_server_context(self) -> ssl.SSLContext:
        """The same as server_credentials, for an HTTP server (aiohttp): TLS 1.2+, client certificates
        signed by `ca` required when `ca` is given."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # trusts no CA but `ca` (not the system's)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.ca:
            context.load_verify_locations(cafile=self.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """As a client: trust `ca`, and present this cert (for servers that require one)."""
        ca = self.ca.read_bytes() if self.ca else None
        return grpc.ssl_channel_credentials(ca, self.key.read_bytes(), self.cert.read_bytes())


def read_tokens(path: Path) -> tuple[str, ...]:
    """One token per line; blank lines and # comments ignored."""
    lines = (line.strip() for line in path.read_text().splitlines())
    tokens = tuple(line for line in lines if line and not line.startswith("#"))
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


def bearer_allowed(authorization: str, tokens: Sequence[bytes]) -> bool:
    """Whether an `Authorization` value is `Bearer <token>` with one of the tokens (what gRPC metadata and
    the HTTP APIs both check), compared in constant time."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    candidate = token.strip().encode()
    # Compare against every token so the time taken does not tell which one was close.
    matches = [hmac.compare_digest(candidate, t) for t in tokens]
    return any(matches)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` with a known token, compared in constant time."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    def _allowed(self, metadata: Sequence[Any] | None) -> bool:
        return bearer_allowed(dict(metadata or ()).get("authorization", ""), self._tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES) or self._allowed(details.invocation_metadata):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")

    args = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **args)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **args)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **args)
    return grpc.stream_stream_rpc_method_handler(refuse, **args)
