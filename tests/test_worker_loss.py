"""A worker that dies or hangs mid-generation: the request fails fast or goes on without it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import grpc
import pytest

import chorus
from chorus.client import build_request
from chorus.v1 import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from chorus_local.cluster import WorkerProcess, spawn_worker
from coordinator.config import ModelSpec
from tests.cluster_helpers import MODELS, LoopThread, coordinator, make_config
from tests.tiny_models import never_ending_llama

LONG = 400  # tokens: the generation is still running when the worker is hit


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return never_ending_llama(tmp_path_factory.mktemp("endless"), MODELS / "arith-sp")


@pytest.fixture(scope="module")
def survivor(endless_model: Path) -> Iterator[WorkerProcess]:
    w = spawn_worker(ModelSpec(name="endless-a", path=str(endless_model)), threads=1, timeout=180)
    yield w
    w.stop()


@pytest.fixture()
def pair(endless_model: Path, survivor: WorkerProcess) -> Iterator[list[WorkerProcess]]:
    """The survivor and a fresh victim worker (each test kills or stops its victim)."""
    workers = [survivor, spawn_worker(ModelSpec(name="endless-b", path=str(endless_model)), threads=1, timeout=180)]
    yield workers
    victim = workers[1]
    if victim.process.poll() is None:
        os.kill(victim.process.pid, signal.SIGCONT)
    victim.stop()


def _sessions(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.ModelWorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5).active_sessions


def _timed_generate(target: str, **kwargs: object) -> tuple[list[float], coordinator_pb2.Completion]:
    """Generate over the raw stream, noting when each response arrived (time.monotonic())."""
    arrivals: list[float] = []
    done = None
    with grpc.insecure_channel(target) as channel:
        for response in coordinator_pb2_grpc.CoordinatorStub(channel).Generate(build_request(**kwargs), timeout=120):
            arrivals.append(time.monotonic())
            if response.HasField("done"):
                done = response.done
    assert done is not None, "the stream ended without a result"
    return arrivals, done


def _hit_mid_generation(
    target: str, victim: WorkerProcess, sig: int, generate: Callable[..., Any] | None = None, **kwargs: object
) -> Future[Any]:
    """Start a long generation (with `generate`, default the SDK's), then send `sig` to the victim worker
    while it serves it."""
    pool = ThreadPoolExecutor(1)
    client = chorus.Client(target, timeout=120)
    future = pool.submit(generate or client.generate, prompt="hello", max_new_tokens=LONG, **kwargs)
    deadline = time.monotonic() + 30
    while _sessions(victim.address) == 0:
        assert time.monotonic() < deadline and not future.done(), "the generation never reached the worker"
        time.sleep(0.01)
    time.sleep(0.2)  # a few steps in
    os.kill(victim.process.pid, sig)
    pool.shutdown(wait=False)
    return future


def test_degrade_goes_on_without_a_killed_worker(loop: LoopThread, pair: list[WorkerProcess]) -> None:
    with coordinator(loop, make_config(pair)) as target:
        result = _hit_mid_generation(target, pair[1], signal.SIGKILL, on_worker_loss="degrade").result(60)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == LONG
    assert result.usage.lost_models == ("endless-b",)
    assert 0 < result.usage.models[1].forward_passes < result.usage.models[0].forward_passes


@pytest.mark.parametrize("strategy", ["me", "unite", "safe", "chared"])
def test_every_strategy_degrades_without_a_killed_worker(
    loop: LoopThread, pair: list[WorkerProcess], strategy: str
) -> None:
    """Drafting (me, safe), scoring (safe), lookups (unite) and kept tables (chared) survive a lost worker."""
    # me samples. End-of-sequence has logit 0 here, never the top one, but a random tiny model's logits are
    # small: at 0.05 it came within reach once in a loaded run (the kill lands at another moment, the text
    # differs); at 0.01 a gap of 0.1 is a factor e^-10 per step.
    sampling = {"temperature": 0.01, "seed": 3} if strategy == "me" else {}
    with coordinator(loop, make_config(pair)) as target:
        future = _hit_mid_generation(
            target, pair[1], signal.SIGKILL, on_worker_loss="degrade", strategy=strategy, **sampling
        )
        result = future.result(90)
    # "length": max_new_tokens, or the context filling first (this random model writes odd bytes that
    # re-tokenize into more tokens than union steps).
    assert result.finish_reason == "length"
    assert result.usage.lost_models == ("endless-b",)
    survivor, victim = result.usage.models
    assert result.usage.completion_tokens >= LONG // 2  # it went on long after the loss
    assert victim.forward_passes < survivor.forward_passes


def test_fail_answers_unavailable_when_a_worker_is_killed(loop: LoopThread, pair: list[WorkerProcess]) -> None:
    with coordinator(loop, make_config(pair)) as target:
        future = _hit_mid_generation(target, pair[1], signal.SIGKILL, on_worker_loss="fail")
        with pytest.raises(chorus.Unavailable, match="endless-b"):
            future.result(60)


def test_a_hung_worker_costs_about_the_step_timeout(loop: LoopThread, pair: list[WorkerProcess]) -> None:
    config = make_config(pair, limits={"step_timeout_s": 0.5})
    with coordinator(loop, config) as target:
        generate = partial(_timed_generate, target)
        future = _hit_mid_generation(target, pair[1], signal.SIGSTOP, generate, on_worker_loss="degrade")
        stopped = time.monotonic()
        arrivals, done = future.result(60)
    assert list(done.usage.lost_models) == ["endless-b"]
    assert done.usage.completion_tokens == LONG
    # The hang is cut after the step timeout: step_timeout_s, or 4x the slowest step so far (the
    # machine is noisy), plus a generous margin; waited out, it would last the client's 120 s.
    gaps = [(b - a, b) for a, b in pairwise(arrivals)]
    before = [gap for gap, end in gaps if end <= stopped]
    timeout = max(config.limits.step_timeout_s, 4 * max(before, default=0.0))
    after = [t for t in arrivals if t > stopped]
    assert after, "nothing arrived after the SIGSTOP"
    assert after[0] - stopped < timeout + 5
    assert max(gap for gap, _ in gaps) < timeout + 5


def test_a_restarted_worker_is_used_again_without_a_restart(loop: LoopThread, pair: list[WorkerProcess]) -> None:
    victim = pair[1]
    port = int(victim.address.rsplit(":", 1)[1])
    with coordinator(loop, make_config(pair)) as target, chorus.Client(target, timeout=60) as client:
        assert client.generate(prompt="hi", max_new_tokens=4).usage.lost_models == ()
        victim.process.kill()
        victim.process.wait()
        with pytest.raises(chorus.Unavailable):
            client.generate(prompt="hi", max_new_tokens=4)
        pair[1] = spawn_worker(victim.spec, threads=1, port=port, timeout=180)
        deadline = time.monotonic() + 20
        while True:
            try:
                result = client.generate(prompt="hi", max_new_tokens=4)
                break
            except chorus.Unavailable:
                assert time.monotonic() < deadline, "the restarted worker was not used again"
                time.sleep(0.2)
    assert result.usage.lost_models == ()
    assert result.usage.models[1].forward_passes > 0


def test_a_worker_exception_fails_the_request_with_internal_and_the_worker_serves_on(loop: LoopThread) -> None:
    """An exception inside the worker (here, in its forward pass) is the request's INTERNAL error with the
    message, not a lost worker; the same worker answers the next request."""
    from model_worker.loading import load_model
    from model_worker.runtime import Runtime
    from model_worker.server import WorkerServer

    async def start() -> tuple[WorkerServer, Runtime]:
        server = WorkerServer("127.0.0.1:0")
        await server.start()
        runtime = Runtime(load_model(str(MODELS / "arith-bpe")))
        await server.ready(runtime)
        return server, runtime

    server, runtime = loop.run(start())
    worker = WorkerProcess(
        ModelSpec(name="arith-bpe", path=str(MODELS / "arith-bpe")), None, f"127.0.0.1:{server.port}"
    )  # type: ignore[arg-type]
    healthy = runtime.engine._run

    def broken(*args: Any) -> Any:
        raise RuntimeError("the forward pass blew up")

    try:
        with coordinator(loop, make_config([worker])) as target, chorus.Client(target, timeout=60, retries=0) as client:
            runtime.engine._run = broken  # type: ignore[method-assign]
            with pytest.raises(chorus.ChorusError) as caught:
                client.generate(prompt="12+35=", max_new_tokens=4, on_worker_loss="degrade")
            assert caught.value.code == grpc.StatusCode.INTERNAL
            assert "the forward pass blew up" in caught.value.details and "lost" not in caught.value.details
            runtime.engine._run = healthy  # type: ignore[method-assign]
            assert client.generate(prompt="12+35=", max_new_tokens=4).text == "48"
    finally:
        loop.run(server.stop(grace=0))


def test_a_busy_worker_is_never_reported_as_lost(loop: LoopThread, tmp_path: Path) -> None:
    """Eight concurrent 1,500-token prompts, prefilled in 64-token chunks on one thread, keep a worker
    busy for far longer than the step timeouts (50 ms, 200 ms for a first step): its liveness check
    answers, so every request finishes and none loses the model (the coordinator used to read the wait
    as a dead worker)."""
    model = never_ending_llama(tmp_path / "long", MODELS / "arith-sp", context=2048)
    spec = ModelSpec(name="busy", path=str(model))
    worker = spawn_worker(spec, threads=1, timeout=180, options={"prefill_chunk": 64})
    try:
        config = make_config([worker], limits={"step_timeout_s": 0.05, "first_step_timeout_s": 0.2})
        prompts = [" ".join(f"{i}+{j}={i + j}" for j in range(180)) for i in range(8)]
        with coordinator(loop, config) as target, chorus.Client(target, timeout=300, retries=0) as client:
            assert min(len(p) for p in prompts) > 1500  # at least 1,500 tokens of digits and signs
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda p: client.generate(prompt=p, max_new_tokens=8), prompts))
        for r in results:
            assert r.usage.lost_models == () and r.usage.completion_tokens == 8
            assert r.usage.models[0].prompt_tokens > 1500
    finally:
        worker.stop()
