"""Typed exceptions for gRPC failures, so callers can catch what they can handle."""

from __future__ import annotations

import grpc


class ChorusError(Exception):
    """Any failed call; `code` is the gRPC status code, `details` the server's message, `retry_after`
    the seconds the server asked a retry to wait (its `retry-after` hint), None if it gave none."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after = retry_after


class InvalidArgument(ChorusError):
    """The request breaks a rule; the message names the field."""


class Unavailable(ChorusError):
    """The coordinator or a model worker cannot serve now; retrying may help."""


class ResourceExhausted(ChorusError):
    """The server is at capacity; retry later."""


class DeadlineExceeded(ChorusError):
    """The call ran past its deadline."""


class Unauthenticated(ChorusError):
    """No valid bearer token was sent."""


class Cancelled(ChorusError):
    """The call was cancelled."""


_BY_CODE: dict[grpc.StatusCode, type[ChorusError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def from_rpc_error(error: grpc.RpcError) -> ChorusError:
    code = error.code()  # type: ignore[attr-defined]
    details = error.details() or ""  # type: ignore[attr-defined]
    hint = retry_hint(error) if hasattr(error, "trailing_metadata") else None
    return _BY_CODE.get(code, ChorusError)(code, details, hint)


def retry_hint(error: grpc.RpcError) -> float | None:
    """The server's wait before a retry, in seconds, from the trailing metadata of a failed call:
    `retry-after` (seconds), else gRPC's `grpc-retry-pushback-ms`; None if it sent neither."""
    found: dict[str, float] = {}
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key in ("retry-after", "grpc-retry-pushback-ms"):
            try:
                seconds = float(value) / (1000 if key == "grpc-retry-pushback-ms" else 1)
            except (TypeError, ValueError):
                continue
            if 0 <= seconds < float("inf"):
                found.setdefault(key, seconds)
    return found.get("retry-after", found.get("grpc-retry-pushback-ms"))
