"""Why a request failed, and how each front end answers it: one table from the exceptions a request may
end with to its reason (counted in chorus_request_failures_total, coordinator.metrics.FAILURE_REASONS),
its gRPC status and its HTTP status with OpenAI's error type.

Both front ends answer failures from here: gRPC in server.py (Generate's one exception handler, which
also counts), HTTP in http_api.py (the middleware that maps exceptions to responses, and a stream's SSE
error event; counted by the middleware count_http_failures, just inside that one), so the two count the
same exception as the same reason. Its `model_name` is the model the request named when that is the
ensemble or one of its members (model_label), else the ensemble's: a name nobody serves never becomes a
label value.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc
from aiohttp import web

from coordinator import metrics
from coordinator.admission import Draining, Overloaded
from coordinator.convert import InvalidRequest
from coordinator.ensemble import NotReady
from coordinator.members import WorkerDraining, WorkerFailed, WorkerLost

log = logging.getLogger(__name__)

# Where an HTTP handler notes the `model` of the JSON body it parsed, in the request's own storage, for
# count_http_failures to label the failure with.
REQUESTED_MODEL: web.RequestKey[object] = web.RequestKey("chorus.requested_model", object)
# The wait a client should leave before retrying a refusal (at capacity, or a model with no ready worker).
RETRY_AFTER_S = 1
DEADLINE_SLACK_S = 0.05


class BadRequest(ValueError):
    """A request an HTTP front end refuses; param: the field at fault (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(LookupError):
    """A `model` that is neither the ensemble nor one of its members: 404, as OpenAI answers."""


@dataclass(frozen=True)
class Status:
    """How the front ends answer one kind of failure."""

    reason: str  # of metrics.FAILURE_REASONS
    grpc: grpc.StatusCode | None  # None: the gRPC handler re-raises (the call is gone, or a bug: UNKNOWN)
    http: int  # 429 and 503 come with Retry-After
    kind: str  # OpenAI's error type
    wait: bool = False  # gRPC: trailing metadata asks the client to wait RETRY_AFTER_S before retrying


_CODE = grpc.StatusCode
_INVALID = Status("invalid", _CODE.INVALID_ARGUMENT, 400, "invalid_request_error")
_UNAVAILABLE = "service_unavailable"

# The table: an exception's row is the first it is an instance of.
STATUSES: dict[type[BaseException], Status] = {
    InvalidRequest: _INVALID,
    BadRequest: _INVALID,
    web.HTTPRequestEntityTooLarge: Status("invalid", _CODE.INVALID_ARGUMENT, 413, "invalid_request_error"),
    ModelNotFound: Status("invalid", _CODE.NOT_FOUND, 404, "invalid_request_error"),
    Overloaded: Status("overloaded", _CODE.RESOURCE_EXHAUSTED, 429, "rate_limit_error", wait=True),
    NotReady: Status("not_ready", _CODE.UNAVAILABLE, 503, _UNAVAILABLE, wait=True),
    # Retry on another coordinator, or with other workers: no need to wait.
    Draining: Status("draining", _CODE.UNAVAILABLE, 503, _UNAVAILABLE),
    WorkerDraining: Status("worker_draining", _CODE.UNAVAILABLE, 503, _UNAVAILABLE),  # before WorkerLost: a subclass
    WorkerLost: Status("worker_lost", _CODE.UNAVAILABLE, 503, _UNAVAILABLE),
    WorkerFailed: Status("worker_failed", _CODE.INTERNAL, 500, "server_error"),
}
# A worker's own status, where it reaches a front end unconverted (members.py converts INTERNAL and
# UNKNOWN to WorkerFailed, UNAVAILABLE and CANCELLED to WorkerLost or degrades); any other code is the
# worker answering an error of its own.
WORKER_STATUSES: dict[grpc.StatusCode, Status] = {
    _CODE.INVALID_ARGUMENT: _INVALID,  # e.g. a prompt past its context
    _CODE.RESOURCE_EXHAUSTED: Status("overloaded", _CODE.RESOURCE_EXHAUSTED, 503, _UNAVAILABLE),  # its KV slots
    _CODE.DEADLINE_EXCEEDED: Status("deadline", _CODE.DEADLINE_EXCEEDED, 503, _UNAVAILABLE),
    _CODE.UNAVAILABLE: Status("worker_lost", _CODE.UNAVAILABLE, 503, _UNAVAILABLE),
    _CODE.CANCELLED: Status("worker_lost", _CODE.UNAVAILABLE, 503, _UNAVAILABLE),
}
_WORKER_FAILED = Status("worker_failed", _CODE.UNAVAILABLE, 503, _UNAVAILABLE)
# The client went away: gRPC cancels the handler (CancelledError, or GeneratorExit when it closes a
# streaming handler); aiohttp's writes to a closed connection raise ConnectionResetError.
_GONE = (asyncio.CancelledError, GeneratorExit, ConnectionError)
_CANCELLED = Status("cancelled", None, 500, "server_error")
_DEADLINE = Status("deadline", None, 500, "server_error")
_INTERNAL = Status("internal", None, 500, "server_error")  # a bug in the coordinator


@dataclass(frozen=True)
class Answer:
    """What the front ends answer for one failed request."""

    status: Status
    details: str  # gRPC's status details
    message: str  # HTTP's error message
    param: str | None = None  # OpenAI's error param
    code: str | None = None  # OpenAI's error code


def status_of(exc: BaseException, time_remaining: float | None = None) -> Status:
    """The table's row for a request that ended with exc. time_remaining: the call's (gRPC's
    context.time_remaining(); None = no deadline), which tells a deadline from a cancel."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return WORKER_STATUSES.get(exc.code(), _WORKER_FAILED)
    for kind, status in STATUSES.items():
        if isinstance(exc, kind):
            return status
    if isinstance(exc, _GONE):
        # gRPC cancels the handler at the deadline, when the clocks may still read a hair before it.
        return _DEADLINE if time_remaining is not None and time_remaining <= DEADLINE_SLACK_S else _CANCELLED
    return _INTERNAL


def answer(exc: BaseException, time_remaining: float | None = None) -> Answer:
    """The status and messages a front end answers a request that ended with exc."""
    status = status_of(exc, time_remaining)
    if isinstance(exc, grpc.aio.AioRpcError):
        return _worker_answer(status, exc)
    if status.grpc is None:
        internal = f"internal error: {type(exc).__name__}"
        return Answer(status, internal, internal)
    param, error_code = None, None
    if isinstance(exc, BadRequest):
        param = exc.param
    elif isinstance(exc, InvalidRequest):
        param = str(exc).split(":", 1)[0]  # its message names the field first
    elif isinstance(exc, ModelNotFound):
        param, error_code = "model", "model_not_found"
    return Answer(status, str(exc), str(exc), param, error_code)


def _worker_answer(status: Status, exc: grpc.aio.AioRpcError) -> Answer:
    """A worker's own status: gRPC passes on its refusals (a prompt past its context, its KV slots full)."""
    code, details = exc.code(), exc.details()
    failed = f"a model worker failed: {code.name}"
    if code == _CODE.INVALID_ARGUMENT:
        return Answer(status, details or code.name, details or "invalid request")
    if code == _CODE.RESOURCE_EXHAUSTED:
        return Answer(status, details or code.name, failed)
    if code == _CODE.DEADLINE_EXCEEDED:
        return Answer(status, "deadline exceeded while generating", failed)
    log.warning("worker failed: %s %s", code, details)
    return Answer(status, f"{failed}: {details}", failed)


def model_label(requested: object, names: Iterable[str]) -> str:
    """The model_name of a request that named `requested`: a member of `names` (served alone), else the ensemble."""
    return requested if isinstance(requested, str) and requested in names else metrics.MODEL_NAME


def count_failure(
    failure: BaseException | str, time_remaining: float | None = None, *, model: str = metrics.MODEL_NAME
) -> str:
    """Count one failed request of `model` (a model_label): an exception (its row's reason) or a reason;
    returns the reason."""
    reason = failure if isinstance(failure, str) else status_of(failure, time_remaining).reason
    if reason not in metrics.FAILURE_REASONS:
        raise ValueError(f"unknown failure reason {reason!r}")
    metrics.count_failure(reason, model)
    return reason


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def count_http_failures(names: Iterable[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """An aiohttp middleware counting each request that raises, then letting it through to the one that
    maps exceptions to responses (list it after that one: it sees the handler's own exception). names:
    the ensemble's models (a request's JSON `model` may name one). aiohttp's own answers (404 for a path
    nobody serves, 405, ...) are not requests of the ensemble and are not counted; a body past the size
    limit (413) is, as invalid."""
    names = tuple(names)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if isinstance(exc, web.HTTPRequestEntityTooLarge):
                count_failure(exc)
            raise
        except BaseException as exc:
            count_failure(exc, model=model_label(_requested_model(request), names))
            raise

    return middleware


def _requested_model(request: web.Request) -> object:
    """The JSON body's `model`, as the handler that parsed the body noted it (never read here: the client
    may be gone); None if no handler got that far."""
    return request.get(REQUESTED_MODEL)
