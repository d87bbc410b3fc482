"""Why a request failed, as its front end answers it: one reason per request, counted in
chorus_request_failures_total (coordinator.metrics.FAILURE_REASONS).

Both front ends call this where they map exceptions to statuses: gRPC in server.py (count_failure
in each branch of Generate), HTTP in http_api.py (the middleware count_http_failures, just inside the
one that maps exceptions to responses), so the two count the same exception as the same reason.
Its `model_name` is the model the request named when that is the ensemble or one of its members
(model_label), else the ensemble's: a name nobody serves never becomes a label value.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable

import grpc
from aiohttp import web

from coordinator import metrics
from coordinator.admission import Draining, Overloaded
from coordinator.convert import InvalidRequest
from coordinator.ensemble import NotReady
from coordinator.generation import WorkerFailed, WorkerLost

# A worker's own status, where it reaches a front end unconverted (generation converts INTERNAL and
# UNKNOWN to WorkerFailed, UNAVAILABLE and CANCELLED to WorkerLost or degrades): any other code is
# the worker answering an error of its own.
_WORKER_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.UNAVAILABLE: "worker_lost",
    grpc.StatusCode.CANCELLED: "worker_lost",
}
# The client went away: gRPC cancels the handler (CancelledError, or GeneratorExit when it closes a
# streaming handler); aiohttp's writes to a closed connection raise ConnectionResetError.
_GONE = (asyncio.CancelledError, GeneratorExit, ConnectionError)
DEADLINE_SLACK_S = 0.05


def failure_reason(
    exc: BaseException, time_remaining: float | None = None, invalid: tuple[type[BaseException], ...] = ()
) -> str:
    """The reason of FAILURE_REASONS for a request that ended with exc. time_remaining: the call's
    (gRPC's context.time_remaining(); None = no deadline), which tells a deadline from a cancel.
    invalid: a front end's own bad-request exceptions."""
    if isinstance(exc, (InvalidRequest, web.HTTPRequestEntityTooLarge, *invalid)):
        return "invalid"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, Draining):
        return "draining"
    if isinstance(exc, NotReady):
        return "not_ready"
    if isinstance(exc, WorkerLost):
        return "worker_lost"
    if isinstance(exc, WorkerFailed):
        return "worker_failed"
    if isinstance(exc, grpc.aio.AioRpcError):
        return _WORKER_CODES.get(exc.code(), "worker_failed")
    if isinstance(exc, _GONE):
        # gRPC cancels the handler at the deadline, when the clocks may still read a hair before it.
        return "deadline" if time_remaining is not None and time_remaining <= DEADLINE_SLACK_S else "cancelled"
    return "internal"


def model_label(requested: object, names: Iterable[str]) -> str:
    """The model_name of a request that named `requested`: a member of `names` (served alone), else the ensemble."""
    return requested if isinstance(requested, str) and requested in names else metrics.MODEL_NAME


def count_failure(
    failure: BaseException | str,
    time_remaining: float | None = None,
    *,
    model: str = metrics.MODEL_NAME,
    invalid: tuple[type[BaseException], ...] = (),
) -> str:
    """Count one failed request of `model` (a model_label): an exception (classified by failure_reason) or a
    reason; returns the reason."""
    reason = failure if isinstance(failure, str) else failure_reason(failure, time_remaining, invalid)
    if reason not in metrics.FAILURE_REASONS:
        raise ValueError(f"unknown failure reason {reason!r}")
    metrics.count_failure(reason, model)
    return reason


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def count_http_failures(
    names: Iterable[str], invalid: tuple[type[BaseException], ...] = ()
) -> Callable[..., Awaitable[web.StreamResponse]]:
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
            count_failure(exc, invalid=invalid, model=model_label(_requested_model(request), names))
            raise

    return middleware


def _requested_model(request: web.Request) -> object:
    """The JSON body's `model`, from the body aiohttp already read (never read here: the client may be gone)."""
    body = getattr(request, "_read_bytes", None)  # aiohttp's cache of request.read()
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return parsed.get("model") if isinstance(parsed, dict) else None
