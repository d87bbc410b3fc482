"""The SDK against flaky servers: retries (backoff, server hints, never once text has arrived), the
default deadline, how a stream ended, round_robin over replicas, keepalive and connection age.

The servers are real grpc.aio servers on localhost (chorus_common.serving.GrpcServer, as in production)
around a fake Coordinator servicer that refuses its first calls as told."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

import chorus
from chorus import client as sdk
from chorus.v1 import coordinator_pb2, coordinator_pb2_grpc
from chorus_common.serving import DEFAULT_MAX_CONNECTION_AGE_S, GrpcServer
from coordinator.config import parse_config
from coordinator.ensemble import Ensemble
from coordinator.server import SERVICE_NAME, CoordinatorServer
from tests.cluster_helpers import MODELS, ROOT, LoopThread

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
FAST = chorus.RetryPolicy(initial_backoff=0.01, max_backoff=0.02)  # retries without waiting long
KINDS = ["sync", "async"]


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    retry_after: str | None = None  # the hint the coordinator sends (seconds)
    pushback_ms: str | None = None  # gRPC's own hint


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Refuses its first calls with `refusals` (one each), and lets the first `die_mid_stream` Generate
    calls that get through fail after their first piece; otherwise streams "4", "7", then done."""

    def __init__(self, name: str = "fake", refusals: list[Refusal] | None = None, die_mid_stream: int = 0) -> None:
        self.name = name
        self.refusals = list(refusals or [])
        self.die_mid_stream = die_mid_stream
        self.arrivals: list[float] = []  # time.monotonic() of each call
        self.deadlines: list[float | None] = []  # what each call had left of its deadline on arrival
        self.peers: list[str] = []

    @property
    def calls(self) -> int:
        return len(self.arrivals)

    async def _arrive(self, context: grpc.aio.ServicerContext) -> None:
        self.arrivals.append(time.monotonic())
        self.deadlines.append(context.time_remaining())
        self.peers.append(context.peer())
        if self.refusals:
            refusal = self.refusals.pop(0)
            metadata = [("retry-after", refusal.retry_after), ("grpc-retry-pushback-ms", refusal.pushback_ms)]
            hints = tuple((key, value) for key, value in metadata if value is not None)
            await context.abort(refusal.code, f"injected {refusal.code.name}", trailing_metadata=hints)

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._arrive(context)
        yield coordinator_pb2.GenerateResponse(text="4")
        if self.die_mid_stream:
            self.die_mid_stream -= 1
            await context.abort(UNAVAILABLE, "a model worker failed mid-stream")
        yield coordinator_pb2.GenerateResponse(text="7")
        usage = coordinator_pb2.Usage(completion_tokens=2, steps=2, steps_ensembled=1)
        request_id = request.request_id or f"{self.name}-{self.calls}"
        done = coordinator_pb2.Completion(finish_reason="length", text="47", usage=usage, request_id=request_id)
        yield coordinator_pb2.GenerateResponse(done=done)

    async def Models(self, request: Any, context: grpc.aio.ServicerContext) -> coordinator_pb2.ModelsResponse:
        await self._arrive(context)
        return coordinator_pb2.ModelsResponse(strategy=self.name)


async def _start(fake: FakeCoordinator, address: str = "127.0.0.1:0", **options: Any) -> GrpcServer:
    def register(server: grpc.aio.Server) -> None:
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)

    server = GrpcServer(address, SERVICE_NAME, register, **options)
    await server.start(serving=True)
    return server


@contextmanager
def serving(loop: LoopThread, *fakes: FakeCoordinator, **options: Any) -> Iterator[list[str]]:
    """Serve each fake on its own port; yields their addresses."""
    servers = [loop.run(_start(fake, **options)) for fake in fakes]
    try:
        yield [f"127.0.0.1:{s.port}" for s in servers]
    finally:
        for s in servers:
            loop.run(s.server.stop(0))


def call(kind: str, target: str, method: str, *args: Any, client: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """client.<method>(...) with a Client or an AsyncClient made with the `client` arguments."""
    if kind == "sync":
        with chorus.Client(target, **(client or {})) as c:
            return getattr(c, method)(*args, **kwargs)

    async def run() -> Any:
        async with chorus.AsyncClient(target, **(client or {})) as c:
            return await getattr(c, method)(*args, **kwargs)

    return asyncio.run(run())


def stream(kind: str, target: str, pieces: list[str], client: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Drain client.stream(...) into `pieces` (kept when it fails); returns the exhausted stream."""
    if kind == "sync":
        with chorus.Client(target, **(client or {})) as c:
            s = c.stream(**kwargs)
            for piece in s:
                assert s.finish_reason is None  # not before the end
                pieces.append(piece)
            return s

    async def run() -> Any:
        async with chorus.AsyncClient(target, **(client or {})) as c:
            s = c.stream(**kwargs)
            async for piece in s:
                assert s.finish_reason is None
                pieces.append(piece)
            return s

    return asyncio.run(run())


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_before_any_response_are_retried(loop: LoopThread, kind: str) -> None:
    fake = FakeCoordinator(refusals=[Refusal(UNAVAILABLE), Refusal(RESOURCE_EXHAUSTED), Refusal(UNAVAILABLE)])
    with serving(loop, fake) as (target,):
        result = call(kind, target, "generate", prompt="12+35=", client={"retries": FAST})
    assert result.text == "47"
    assert fake.calls == 4


@pytest.mark.parametrize("kind", KINDS)
def test_a_retry_waits_at_least_the_servers_hint(loop: LoopThread, kind: str) -> None:
    """The backoff alone (FAST: at most 20 ms) would retry sooner than the 0.3 s the server asks."""
    fake = FakeCoordinator(refusals=[Refusal(RESOURCE_EXHAUSTED, retry_after="0.3"), Refusal(UNAVAILABLE, "0.3")])
    with serving(loop, fake) as (target,):
        pieces: list[str] = []
        s = stream(kind, target, pieces, client={"retries": FAST}, prompt="12+35=")
    assert pieces == ["4", "7"]
    assert s.finish_reason == "length"
    assert fake.calls == 3
    assert all(gap >= 0.29 for gap in gaps(fake.arrivals)), gaps(fake.arrivals)


@pytest.mark.parametrize("kind", KINDS)
def test_models_is_retried_by_grpc_with_its_pushback_hint(loop: LoopThread, kind: str) -> None:
    """Models (unary) is retried by gRPC's own retry policy, which reads grpc-retry-pushback-ms."""
    fake = FakeCoordinator(refusals=[Refusal(UNAVAILABLE, pushback_ms="300"), Refusal(RESOURCE_EXHAUSTED)])
    with serving(loop, fake) as (target,):
        assert call(kind, target, "models", client={"retries": FAST}).strategy == "fake"
    assert fake.calls == 3
    assert gaps(fake.arrivals)[0] >= 0.29, gaps(fake.arrivals)


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_that_has_yielded_text_is_not_retried(loop: LoopThread, kind: str) -> None:
    fake = FakeCoordinator(die_mid_stream=1)  # a retry would succeed, and repeat the "4"
    with serving(loop, fake) as (target,):
        pieces: list[str] = []
        with pytest.raises(chorus.Unavailable, match="mid-stream"):
            stream(kind, target, pieces, client={"retries": FAST}, prompt="12+35=")
        assert pieces == ["4"]
        assert fake.calls == 1
        fake.die_mid_stream = 1  # nor is a generate() whose stream failed after a response
        with pytest.raises(chorus.Unavailable, match="mid-stream"):
            call(kind, target, "generate", prompt="12+35=", client={"retries": FAST})
        assert fake.calls == 2


@pytest.mark.parametrize("kind", KINDS)
def test_retries_0_raises_at_once(loop: LoopThread, kind: str) -> None:
    fake = FakeCoordinator(refusals=[Refusal(UNAVAILABLE)] * 2 + [Refusal(RESOURCE_EXHAUSTED)])
    with serving(loop, fake) as (target,):
        with pytest.raises(chorus.Unavailable):
            call(kind, target, "generate", prompt="12+35=", client={"retries": 0})
        assert fake.calls == 1
        with pytest.raises(chorus.Unavailable):
            call(kind, target, "models", client={"retries": 0})
        assert fake.calls == 2
        with pytest.raises(chorus.ResourceExhausted):
            call(kind, target, "generate", prompt="12+35=", client={"retries": chorus.RetryPolicy(max_attempts=1)})
        assert fake.calls == 3


@pytest.mark.parametrize("kind", KINDS)
def test_retries_stop_after_max_attempts(loop: LoopThread, kind: str) -> None:
    fake = FakeCoordinator(refusals=[Refusal(UNAVAILABLE)] * 10)
    with serving(loop, fake) as (target,):
        policy = chorus.RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
        with pytest.raises(chorus.Unavailable, match="injected"):
            call(kind, target, "generate", prompt="12+35=", client={"retries": policy})
        assert fake.calls == 3
        with pytest.raises(chorus.Unavailable, match="injected"):
            call(kind, target, "generate", prompt="12+35=", client={"retries": 2})  # 2 retries: 3 attempts
        assert fake.calls == 6


def test_other_codes_are_not_retried(loop: LoopThread) -> None:
    fake = FakeCoordinator(refusals=[Refusal(grpc.StatusCode.INVALID_ARGUMENT), Refusal(grpc.StatusCode.INTERNAL)])
    with serving(loop, fake) as (target,), chorus.Client(target, retries=FAST) as client:
        with pytest.raises(chorus.InvalidArgument):
            client.generate(prompt="12+35=")
        with pytest.raises(chorus.ChorusError):
            client.generate(prompt="12+35=")
        assert fake.calls == 2


def test_no_retry_is_begun_that_the_deadline_would_cut(loop: LoopThread) -> None:
    fake = FakeCoordinator(refusals=[Refusal(RESOURCE_EXHAUSTED, retry_after="30")])
    with serving(loop, fake) as (target,), chorus.Client(target, retries=FAST) as client:
        started = time.monotonic()
        with pytest.raises(chorus.ResourceExhausted):  # the server's reason, not DEADLINE_EXCEEDED
            client.generate(prompt="12+35=", timeout=5)
        assert time.monotonic() - started < 5  # gave up at once rather than sleep into the deadline
        assert fake.calls == 1


def test_a_server_that_is_not_up_yet_is_retried_until_it_is(loop: LoopThread) -> None:
    """A coordinator restarting: connections are refused (UNAVAILABLE) for a moment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake = FakeCoordinator()

    async def start_late() -> GrpcServer:
        await asyncio.sleep(0.5)
        return await _start(fake, f"127.0.0.1:{port}")

    starting = asyncio.run_coroutine_threadsafe(start_late(), loop.loop)
    try:
        policy = chorus.RetryPolicy(max_attempts=30, initial_backoff=0.1, max_backoff=0.3)
        with chorus.Client(f"127.0.0.1:{port}", retries=policy) as client:
            assert client.generate(prompt="12+35=").text == "47"
    finally:
        loop.run(starting.result(30).server.stop(0))


def test_retry_policies_are_checked() -> None:
    for bad in (
        {"max_attempts": 0},
        {"max_attempts": 2.5},
        {"initial_backoff": 0},
        {"initial_backoff": 2, "max_backoff": 1},
        {"multiplier": 0.5},
    ):
        with pytest.raises(ValueError):
            chorus.RetryPolicy(**bad)
    for retries in (-1, True, "3"):
        with pytest.raises(ValueError, match="retries"):
            chorus.Client("127.0.0.1:1", retries=retries)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="load_balancing"):
        chorus.Client("127.0.0.1:1", load_balancing="random")


def test_the_service_config_retries_models_only() -> None:
    config = sdk.service_config(chorus.RetryPolicy(max_attempts=9), None)
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "chorus.v1.Coordinator", "method": "Models"}]  # Generate: the SDK
    assert method["retryPolicy"]["maxAttempts"] == 5  # gRPC's cap
    assert set(method["retryPolicy"]["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert "loadBalancingConfig" not in config
    assert sdk.service_config(chorus.RetryPolicy.of(0), None) == {}
    assert sdk.service_config(chorus.RetryPolicy.of(0), "round_robin") == {"loadBalancingConfig": [{"round_robin": {}}]}
    options = dict(sdk.channel_options(chorus.RetryPolicy(), "round_robin"))
    assert json.loads(options["grpc.service_config"]) == sdk.service_config(chorus.RetryPolicy(), "round_robin")


# --------------------------------------------------------------------------- deadlines


@pytest.mark.parametrize("kind", KINDS)
def test_every_call_has_the_default_deadline_unless_told(loop: LoopThread, kind: str) -> None:
    fake = FakeCoordinator()
    with serving(loop, fake) as (target,):
        call(kind, target, "generate", prompt="12+35=")
        call(kind, target, "models")
        call(kind, target, "generate", prompt="12+35=", timeout=5)
        call(kind, target, "generate", prompt="12+35=", client={"timeout": 30})
        call(kind, target, "generate", prompt="12+35=", client={"timeout": None})  # explicitly none
        call(kind, target, "generate", prompt="12+35=", timeout=None)  # explicitly none, for this call
        pieces: list[str] = []
        stream(kind, target, pieces, prompt="12+35=")
    default, models, per_call, client_wide, none, per_call_none, streamed = fake.deadlines
    # gRPC sends deadlines rounded up (600 s arrives as up to 601 s): loose bounds.
    assert chorus.DEFAULT_TIMEOUT == 600
    for remaining in (default, models, streamed):
        assert remaining is not None and 500 < remaining <= 602
    assert per_call is not None and 0 < per_call <= 6
    assert client_wide is not None and 6 < client_wide <= 32
    assert none is None and per_call_none is None


# --------------------------------------------------------------------------- how a stream ended


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_says_how_it_ended(loop: LoopThread, kind: str) -> None:
    with serving(loop, FakeCoordinator()) as (target,):
        pieces: list[str] = []
        s = stream(kind, target, pieces, prompt="12+35=", request_id="req-1")
    assert pieces == ["4", "7"]
    assert s.finish_reason == "length"
    assert s.usage.completion_tokens == 2 and s.usage.steps_ensembled == 1
    assert s.request_id == "req-1"
    assert s.result == chorus.Result(text="47", finish_reason="length", usage=s.usage, request_id="req-1")


def test_a_stream_closed_early_has_no_ending(loop: LoopThread) -> None:
    with serving(loop, FakeCoordinator()) as (target,), chorus.Client(target) as client:
        with client.stream(prompt="12+35=") as s:
            assert next(s) == "4"
        assert s.result is None and s.finish_reason is None and s.usage is None and s.request_id is None
        with pytest.raises(StopIteration):
            next(s)


# --------------------------------------------------------------------------- balancing, connections


def test_round_robin_spreads_calls_over_replicas(loop: LoopThread) -> None:
    first, second = FakeCoordinator("first"), FakeCoordinator("second")
    with serving(loop, first, second) as addresses:
        target = "ipv4:" + ",".join(addresses)
        with chorus.Client(target) as client:  # pick_first, gRPC's default: one connection, one server
            for _ in range(10):
                client.generate(prompt="12+35=")
        assert (first.calls, second.calls) == (10, 0)
        with chorus.Client(target, load_balancing="round_robin") as client:
            for _ in range(20):
                client.generate(prompt="12+35=")
        assert first.calls > 10 and second.calls > 0
        assert first.calls + second.calls == 30


def test_async_round_robin_spreads_calls_over_replicas(loop: LoopThread) -> None:
    first, second = FakeCoordinator("first"), FakeCoordinator("second")
    with serving(loop, first, second) as addresses:

        async def run() -> set[str]:
            async with chorus.AsyncClient("ipv4:" + ",".join(addresses), load_balancing="round_robin") as client:
                return {(await client.models()).strategy for _ in range(20)}

        assert asyncio.run(run()) == {"first", "second"}


def test_servers_age_connections_out(loop: LoopThread) -> None:
    """After max_connection_age the client is sent GOAWAY and reconnects: a new connection (peer)."""
    fake = FakeCoordinator()
    with serving(loop, fake, max_connection_age_s=0.2) as (target,), chorus.Client(target) as client:
        deadline = time.monotonic() + 20
        while len(set(fake.peers)) < 2:
            assert time.monotonic() < deadline, f"one connection all along: {set(fake.peers)}"
            client.models()
            time.sleep(0.05)


async def _options(**kwargs: Any) -> dict[str, Any]:
    server = GrpcServer("127.0.0.1:0", SERVICE_NAME, lambda s: None, **kwargs)
    return dict(server.options)


def test_grpc_server_options(loop: LoopThread) -> None:
    default = loop.run(_options())
    assert DEFAULT_MAX_CONNECTION_AGE_S == 300
    assert default["grpc.max_connection_age_ms"] == 300_000
    assert default["grpc.max_connection_age_grace_ms"] == 2**31 - 1  # calls in flight are never cut
    custom = loop.run(_options(max_connection_age_s=60, max_connection_age_grace_s=2.5))
    assert (custom["grpc.max_connection_age_ms"], custom["grpc.max_connection_age_grace_ms"]) == (60_000, 2_500)
    off = loop.run(_options(max_connection_age_s=None))
    assert "grpc.max_connection_age_ms" not in off and "grpc.max_connection_age_grace_ms" not in off
    for bad in ({"max_connection_age_s": 0}, {"max_connection_age_grace_s": -1}, {"max_connection_age_s": 1e10}):
        with pytest.raises(ValueError, match="max_connection_age"):
            loop.run(_options(**bad))


def test_client_keepalive_pings_are_ones_servers_accept(loop: LoopThread) -> None:
    """A server answers pings more frequent than its minimum interval with GOAWAY "too_many_pings"."""
    client = dict(sdk.channel_options(chorus.RetryPolicy(), None))
    server = loop.run(_options())
    assert client["grpc.keepalive_time_ms"] > server["grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_permit_without_calls"] == 1  # idle connections are pinged...
    assert server["grpc.keepalive_permit_without_calls"] == 1  # ...which the server allows


# --------------------------------------------------------------------------- the coordinator


def _refusal(target: str) -> tuple[grpc.StatusCode, dict[str, str]]:
    with grpc.insecure_channel(target) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        try:
            for _ in stub.Generate(coordinator_pb2.GenerateRequest(prompt="12+35="), timeout=10):
                pass
        except grpc.RpcError as exc:
            return exc.code(), dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
    raise AssertionError("the call was not refused")


def test_the_coordinator_sends_a_retry_hint_with_its_refusals(loop: LoopThread) -> None:
    config = parse_config(
        {"models": [{"name": "arith-bpe", "path": str(MODELS / "arith-bpe")}], "server": {"port": 0}}, ROOT
    )

    async def start() -> CoordinatorServer:
        server = CoordinatorServer(Ensemble.from_config(config), "127.0.0.1:0")  # no worker: not ready
        await server.start()
        return server

    server = loop.run(start())
    target = f"127.0.0.1:{server.port}"
    try:
        code, metadata = _refusal(target)
        assert code == UNAVAILABLE
        assert (metadata["retry-after"], metadata["grpc-retry-pushback-ms"]) == ("1", "1000")
        # The SDK waits the hint before its retry.
        with chorus.Client(target, retries=chorus.RetryPolicy(max_attempts=2, initial_backoff=0.01)) as client:
            started = time.monotonic()
            with pytest.raises(chorus.Unavailable, match="arith-bpe"):
                client.generate(prompt="12+35=")
            assert time.monotonic() - started >= 0.99
        server.admission.capacity = 0  # at capacity
        code, metadata = _refusal(target)
        assert code == RESOURCE_EXHAUSTED
        assert (metadata["retry-after"], metadata["grpc-retry-pushback-ms"]) == ("1", "1000")
        server.admission.draining = True  # shutting down: retry on another replica, no need to wait
        code, metadata = _refusal(target)
        assert code == UNAVAILABLE
        assert "retry-after" not in metadata
    finally:
        loop.run(server.stop(grace=0))


def test_the_coordinator_ages_connections_as_configured(loop: LoopThread) -> None:
    model = {"name": "arith-bpe", "path": str(MODELS / "arith-bpe")}
    settings = {"port": 0, "max_connection_age_s": 120, "max_connection_age_grace_s": 30}
    config = parse_config({"models": [model], "server": settings}, ROOT)

    async def options() -> dict[str, Any]:
        server = CoordinatorServer(Ensemble.from_config(config), "127.0.0.1:0")
        return dict(server.grpc.options)

    configured = loop.run(options())
    assert (configured["grpc.max_connection_age_ms"], configured["grpc.max_connection_age_grace_ms"]) == (
        120_000,
        30_000,
    )
