"""A worker that dies or hangs mid-generation: the request fails fast or goes on without it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import chorus
from chorus.v1 import worker_pb2, worker_pb2_grpc
from coordinator.cluster import WorkerProcess, spawn_worker
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


def _hit_mid_generation(target: str, victim: WorkerProcess, sig: int, **kwargs: object) -> Future[chorus.Result]:
    """Start a long generation, then send `sig` to the victim worker while it serves it."""
    pool = ThreadPoolExecutor(1)
    client = chorus.Client(target, timeout=120)
    future = pool.submit(client.generate, prompt="hello", max_new_tokens=LONG, **kwargs)
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


def test_fail_answers_unavailable_when_a_worker_is_killed(loop: LoopThread, pair: list[WorkerProcess]) -> None:
    with coordinator(loop, make_config(pair)) as target:
        future = _hit_mid_generation(target, pair[1], signal.SIGKILL, on_worker_loss="fail")
        with pytest.raises(chorus.Unavailable, match="endless-b"):
            future.result(60)


def test_a_hung_worker_costs_about_the_step_timeout(loop: LoopThread, pair: list[WorkerProcess]) -> None:
    config = make_config(pair, limits={"step_timeout_s": 0.5})
    with coordinator(loop, config) as target:
        started = time.monotonic()
        result = _hit_mid_generation(target, pair[1], signal.SIGSTOP, on_worker_loss="degrade").result(60)
        elapsed = time.monotonic() - started
    assert result.usage.lost_models == ("endless-b",)
    assert result.usage.completion_tokens == LONG
    # Not a timing test: only that the hang was cut, not waited out (the client deadline is 120 s).
    assert elapsed < 60


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
