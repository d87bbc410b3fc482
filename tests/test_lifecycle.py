"""Process lifecycle through real processes: idle sessions reclaimed, deadlines reaching the
workers, and draining on SIGTERM (what Kubernetes sends)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import chorus
from chorus.v1 import worker_pb2, worker_pb2_grpc
from chorus_common.serving import LIVENESS
from chorus_common.types import Prompt
from chorus_local.cluster import WorkerProcess, spawn_worker
from coordinator.config import ModelSpec
from coordinator.workers import ModelSession, Transport, WorkerClient
from tests.cluster_helpers import MODELS, ROOT, LoopThread, coordinator, make_config
from tests.tiny_models import never_ending_llama

LONG = 1200  # tokens: about 4 s on a quiet CPU core, long enough to act while the request runs
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny never-ending Llama with a 4096-token context (rotary positions: only the config says 512)."""
    path = never_ending_llama(tmp_path_factory.mktemp("long"), MODELS / "arith-sp")
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (path / "config.json").write_text(json.dumps(config))
    return path


def _spawn(model: Path, **options: float) -> WorkerProcess:
    return spawn_worker(ModelSpec(name="endless", path=str(model)), threads=1, timeout=180, options=options)


@pytest.fixture(scope="module")
def _endless_holder(long_model: Path) -> Iterator[list[WorkerProcess]]:
    holder = [_spawn(long_model)]
    yield holder
    holder[0].stop()


@pytest.fixture()
def endless(long_model: Path, _endless_holder: list[WorkerProcess]) -> WorkerProcess:
    """A worker with the default session TTL (600 s): nothing but the tests' own actions ends its sessions.
    Shared by the tests; one that ends it (the worker drain, last) makes the next test get a fresh one."""
    if _endless_holder[0].process.poll() is not None:
        _endless_holder[0] = _spawn(long_model)
    return _endless_holder[0]


def _sessions(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.ModelWorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5).active_sessions


def _health(address: str, service: str = "") -> object:
    """The health status, or the status code of a health check that got no answer."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return reply.status


def _wait_until(check: Callable[[], bool], what: str, timeout: float) -> float:
    """Poll until check() holds; returns the time.monotonic() at which it was seen to hold."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(0.02)
    return time.monotonic()


class CoordinatorProcess:
    """`chorus coordinator` as a subprocess over one worker (its output goes to a file: a full pipe would stall it)."""

    def __init__(self, tmp_path: Path, worker: WorkerProcess, grace: float) -> None:
        config = tmp_path / "chorus.yaml"
        config.write_text(json.dumps({"models": [{"name": worker.spec.name, "path": worker.spec.path}]}))
        self.log = tmp_path / "coordinator.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "chorus.cli",
                    "coordinator",
                    "--config",
                    str(config),
                    "--port",
                    "0",
                    "--grace",
                    str(grace),
                    "--worker",
                    f"{worker.spec.name}={worker.address}",
                ],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 120
        while True:
            served = [line for line in self.log.read_text().splitlines() if line.startswith("chorus serving on ")]
            if served:
                self.target = served[0].split()[-1]
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"the coordinator did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(30)


# --------------------------------------------------------------------------- idle sessions


def test_a_worker_process_reclaims_sessions_idle_past_the_ttl(loop: LoopThread, long_model: Path) -> None:
    ttl = 1.0  # the reaper runs every ttl / 4 s
    w = _spawn(long_model, session_ttl=ttl)
    transport = Transport(top_k=5, half=False)

    async def connect() -> WorkerClient:
        return WorkerClient(w.address)  # grpc.aio channels belong to the loop that made them

    async def open_and_step(client: WorkerClient) -> tuple[ModelSession, float]:
        session = client.session(60)
        await session.open(Prompt(text="hello"), "ttl-test")
        # Stepping keeps a session alive past the TTL (1.6 s here): only idleness counts, not age.
        for _ in range(8):
            await session.step(b" ", transport)
            await asyncio.sleep(0.2)
        await session.step(b" ", transport)
        return session, time.monotonic()

    client: WorkerClient | None = None
    try:
        client = loop.run(connect())
        session, last_step = loop.run(open_and_step(client))
        freed = _wait_until(lambda: _sessions(w.address) == 0, "the idle session was reclaimed", timeout=15)
        # Seen freed only after the TTL (never early), and within a few reaper rounds of it.
        assert ttl <= freed - last_step < ttl + 8
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            loop.run(session.step(b" ", transport))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "idle" in (caught.value.details() or "")
    finally:
        if client is not None:
            loop.run(client.close())
        w.stop()


# --------------------------------------------------------------------------- deadlines


def test_a_client_deadline_reaches_the_workers_session(tmp_path: Path, endless: WorkerProcess) -> None:
    """With the coordinator frozen (SIGSTOP) it can cancel nothing: the worker's session still ends at
    the client's deadline, so the deadline itself travelled to the worker (its TTL is 600 s)."""
    deadline_s = 3.0
    coord = CoordinatorProcess(tmp_path, endless, grace=1)
    try:
        with chorus.Client(coord.target) as client, ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            future = pool.submit(client.generate, prompt="hello", max_new_tokens=3000, timeout=deadline_s)
            _wait_until(lambda: _sessions(endless.address) == 1, "the request reached the worker", timeout=30)
            coord.process.send_signal(signal.SIGSTOP)
            assert not future.done()
            freed = _wait_until(
                lambda: _sessions(endless.address) == 0, "the worker ended the session", timeout=deadline_s + 15
            )
            with pytest.raises(chorus.DeadlineExceeded):
                future.result(10)
        # Not before the deadline (nothing else ended it), and not long after it.
        assert deadline_s <= freed - started < deadline_s + 8
    finally:
        coord.close()


# --------------------------------------------------------------------------- draining


def test_sigterm_drains_a_coordinator_process(tmp_path: Path, endless: WorkerProcess) -> None:
    coord = CoordinatorProcess(tmp_path, endless, grace=30)
    try:
        # retries=0: the refusal itself is under test (the SDK would retry it by default).
        with chorus.Client(coord.target, timeout=60, retries=0) as client, ThreadPoolExecutor(1) as pool:
            assert _health(coord.target) == SERVING
            in_flight = pool.submit(client.generate, prompt="hello", max_new_tokens=LONG)
            _wait_until(lambda: _sessions(endless.address) == 1, "the request reached the worker", timeout=30)
            coord.process.send_signal(signal.SIGTERM)
            # It still answers health checks, with NOT_SERVING, and refuses new requests as retryable.
            _wait_until(lambda: _health(coord.target) == NOT_SERVING, "health says NOT_SERVING", timeout=5)
            assert _health(coord.target, LIVENESS) == SERVING
            with pytest.raises(chorus.Unavailable):
                client.generate(prompt="hello", max_new_tokens=4)
            assert not in_flight.done(), "the request ended before the drain was checked: make LONG longer"
            result = in_flight.result(60)
            finished = time.monotonic()
        assert result.finish_reason == "length"
        assert result.usage.completion_tokens == LONG
        # It exits once the request is done, not after the whole grace period.
        assert coord.process.wait(25) == 0
        assert time.monotonic() - finished < 15
    finally:
        coord.close()


def test_sigterm_drains_a_worker_process(loop: LoopThread, endless: WorkerProcess) -> None:
    victim = endless  # its --grace is the default 30 s
    try:
        with (
            # No wait for another replica to join (limits.replica_wait_s): none can, and the refusal must
            # come while the running request still runs.
            coordinator(loop, make_config([victim], limits={"replica_wait_s": 0})) as target,
            chorus.Client(target, timeout=60, retries=0) as client,
            ThreadPoolExecutor(1) as pool,
        ):
            in_flight = pool.submit(client.generate, prompt="hello", max_new_tokens=LONG)
            _wait_until(lambda: _sessions(victim.address) == 1, "the request reached the worker", timeout=30)
            victim.process.send_signal(signal.SIGTERM)
            # Probes get answers: readiness NOT_SERVING (no new traffic), liveness still SERVING.
            _wait_until(lambda: _health(victim.address) == NOT_SERVING, "health says NOT_SERVING", timeout=5)
            assert _health(victim.address, LIVENESS) == SERVING
            with pytest.raises(chorus.Unavailable, match="shutting down") as refused:
                client.generate(prompt="hello", max_new_tokens=4)  # a new session is refused
            _says_draining_not_lost(refused.value, victim)
            assert not in_flight.done(), "the request ended before the drain was checked: make LONG longer"
            result = in_flight.result(60)
            finished = time.monotonic()
        assert result.finish_reason == "length"
        assert result.usage.completion_tokens == LONG
        assert result.usage.lost_models == ()
        assert victim.process.wait(25) == 0
        assert time.monotonic() - finished < 15  # not the whole grace period
    finally:
        victim.stop()


def _says_draining_not_lost(error: chorus.ChorusError, worker: WorkerProcess) -> None:
    """The coordinator's words for a worker that drains: shutting down, not lost."""
    assert f"the worker of model {worker.spec.name!r} is shutting down (draining)" in error.details, error.details
    assert "lost" not in error.details, error.details


def test_sessions_still_running_when_the_grace_period_ends_fail_with_shutting_down(
    loop: LoopThread, long_model: Path
) -> None:
    """A draining worker lets running sessions finish within its grace period; those still running then
    end with UNAVAILABLE saying the worker is shutting down: never INTERNAL, never a silent cut."""
    victim = _spawn(long_model, grace=1.0)
    try:
        with (
            coordinator(loop, make_config([victim])) as target,
            chorus.Client(target, timeout=60, retries=0) as client,
            ThreadPoolExecutor(1) as pool,
        ):
            in_flight = pool.submit(client.generate, prompt="hello", max_new_tokens=4000)  # far past the grace
            _wait_until(lambda: _sessions(victim.address) == 1, "the request reached the worker", timeout=30)
            victim.process.send_signal(signal.SIGTERM)
            with pytest.raises(chorus.Unavailable, match="shutting down") as caught:
                in_flight.result(30)
            assert "INTERNAL" not in str(caught.value)
            _says_draining_not_lost(caught.value, victim)
        assert victim.process.wait(15) == 0
    finally:
        victim.stop()


def test_a_session_between_messages_when_the_grace_ends_reads_the_draining_status_on_its_next_one(
    tmp_path: Path,
) -> None:
    """Ended while its client was about to write, a session's status could reach the client as gRPC's own
    INTERNAL (grpc/grpc#36066), and a draining worker would read as lost. Between messages when the grace
    period ends, the session is ended on the client's next message: that write goes through and the read
    after it gets UNAVAILABLE with the draining mark."""
    from chorus_common.serving import DRAINING_KEY
    from model_worker.loading import load_model
    from model_worker.runtime import Runtime
    from model_worker.server import WorkerServer

    model = never_ending_llama(tmp_path)

    async def run() -> None:
        server = WorkerServer("127.0.0.1:0")
        await server.start()
        await server.ready(Runtime(load_model(str(model))))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = worker_pb2_grpc.ModelWorkerStub(channel).Session(timeout=30)
            await call.write(worker_pb2.SessionRequest(open=worker_pb2.SessionOpen(prompt={"text": "a"})))
            await call.read()
            step = worker_pb2.SessionRequest(step=worker_pb2.SessionStep(append=b"", format=worker_pb2.TOP_K, top_k=4))
            await call.write(step)
            await call.read()
            stopping = asyncio.ensure_future(server.stop(grace=0))
            await asyncio.sleep(0.3)  # the grace period is over while the session waits for its next message
            await call.write(step)  # goes through: the session is still open
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
            assert any(key == DRAINING_KEY for key, _ in caught.value.trailing_metadata() or ())
            await stopping

    asyncio.run(run())


@pytest.mark.parametrize("draining", [True, False])
def test_an_unmarked_internal_from_a_worker_that_no_longer_serves_reads_as_draining(
    loop: LoopThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, draining: bool
) -> None:
    """The rest of the race above: a session the grace period ends while its client writes can still reach the
    coordinator as gRPC's own INTERNAL, with no mark. The coordinator then asks the worker's health service:
    alive but not serving is a worker shutting down, not a lost one. The control: the same INTERNAL from a
    worker that still serves reads as lost."""
    from model_worker.loading import load_model
    from model_worker.runtime import Runtime
    from model_worker.server import WorkerServer, WorkerService

    hit = asyncio.Event()
    plain = WorkerService.Session

    async def broken_under_the_client(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for response in plain(self, request_iterator, context):
            if hit.is_set():
                await context.abort(grpc.StatusCode.INTERNAL, "Internal error from Core")
            yield response

    monkeypatch.setattr(WorkerService, "Session", broken_under_the_client)
    model = never_ending_llama(tmp_path, MODELS / "arith-sp")

    async def start() -> WorkerServer:
        server = WorkerServer("127.0.0.1:0")
        await server.start()
        await server.ready(Runtime(load_model(str(model))))
        return server

    server = loop.run(start())

    async def break_it() -> None:
        if draining:
            server.service.draining = True
            await server.grpc.set_serving(False)
        hit.set()

    try:
        spec = ModelSpec(name="endless", path=str(model))
        worker = WorkerProcess(spec=spec, address=f"127.0.0.1:{server.port}", process=None)  # type: ignore[arg-type]
        with (
            coordinator(loop, make_config([worker])) as target,
            chorus.Client(target, timeout=60, retries=0) as client,
            ThreadPoolExecutor(1) as pool,
        ):
            running = pool.submit(client.generate, prompt="hello", max_new_tokens=LONG)
            time.sleep(1.0)  # a few steps in
            loop.run(break_it())
            with pytest.raises(chorus.ChorusError) as caught:
                running.result(timeout=60)
        if draining:
            _says_draining_not_lost(caught.value, worker)
        else:
            assert f"the worker of model {spec.name!r} was lost" in caught.value.details, caught.value.details
    finally:
        loop.run(server.stop(grace=0))
