"""Request handling through real servers: bad input, cancellation, and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import chorus
from chorus.v1 import worker_pb2, worker_pb2_grpc
from chorus_local.cluster import WorkerProcess, start_coordinator
from tests.cluster_helpers import MODELS, ROOT, LoopThread, coordinator, make_config, worker
from tests.tiny_models import never_ending_llama


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return never_ending_llama(tmp_path_factory.mktemp("endless"), MODELS / "arith-sp")


@pytest.fixture(scope="module")
def endless_workers(endless_model: Path) -> Iterator[list[WorkerProcess]]:
    workers = [worker(endless_model, "endless-a"), worker(endless_model, "endless-b")]
    yield workers
    for w in workers:
        w.stop()


def _active_sessions(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.ModelWorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10).active_sessions


def test_cancelling_a_request_frees_the_workers_sessions(
    loop: LoopThread, endless_workers: list[WorkerProcess]
) -> None:
    workers = endless_workers
    with coordinator(loop, make_config(workers)) as target, chorus.Client(target, timeout=60) as client:
        assert client.generate(prompt="hello", max_new_tokens=40).finish_reason == "length"
        stream = client.stream(prompt="hello", max_new_tokens=4000)
        next(stream)
        assert [_active_sessions(w.address) for w in workers] == [1, 1]
        stream.close()  # cancels the call
        deadline = time.monotonic() + 10
        while any(_active_sessions(w.address) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [_active_sessions(w.address) for w in workers] == [0, 0]
        # A client deadline ends the request and frees the sessions too.
        with pytest.raises(chorus.DeadlineExceeded):
            client.generate(prompt="hello", max_new_tokens=4000, timeout=0.5)
        deadline = time.monotonic() + 10
        while any(_active_sessions(w.address) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [_active_sessions(w.address) for w in workers] == [0, 0]


BAD_REQUESTS = [
    ({"prompt": ""}, "prompt"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": []}, "messages"),
    ({"prompt": "1+1=", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "1+1=", "max_new_tokens": 10**7}, "max_new_tokens"),
    ({"prompt": "1+1=", "temperature": float("nan")}, "temperature"),
    ({"prompt": "1+1=", "temperature": -1.0}, "temperature"),
    ({"prompt": "1+1=", "top_p": 0.0}, "top_p"),
    ({"prompt": "1+1=", "top_p": 1.5}, "top_p"),
    ({"prompt": "1+1=", "strategy": "nope"}, "strategy"),
    ({"prompt": "1+1=", "strategy": "threshold"}, "primary"),
    ({"prompt": "1+1=", "stop": [""]}, "stop"),
    ({"prompt": "1+1=", "threshold": -0.5}, "threshold"),
    # Accepted, they would do nothing: a threshold under a strategy that reads none (the config's: gac), a chat
    # template for a text prompt.
    ({"prompt": "1+1=", "threshold": 0.5}, "threshold: only the threshold strategy reads it; this request's strategy"),
    ({"prompt": "1+1=", "apply_chat_template": True}, "apply_chat_template: true applies to messages"),
    # Bounded whatever the config: a probability; stop strings matched at every step; an id in every log line.
    ({"prompt": "1+1=", "threshold": 5.0}, "threshold: 5.0 is outside [0.0, 1.0]"),
    ({"prompt": "1+1=", "stop": ["\n", "x" * 1_000_000]}, "stop[1]: 1000000 bytes, at most 256"),
    ({"prompt": "1+1=", "request_id": "r" * 1_000_000}, "request_id: 1000000 bytes, at most 128"),
    ({"prompt": "1+1=", "request_id": "a\nfake log line"}, "request_id: 'a\\nfake log line' has a character"),
    ({"prompt": "1+1=", "strategy": "s" * 1_000_000}, "strategy: unknown 'ssss"),
    ({"prompt": "1+1=" * 100}, "context"),
    ({"prompt": "1+1=", "weights": {"no-such-model": 1.0}}, "weights"),
    ({"prompt": "1+1=", "weights": {"arith-bpe": -1.0}}, "weights"),
    ({"conversations": [[{"role": "user", "content": "1"}]] * 65}, "conversations"),
    # Over limits.max_prompt_bytes (1000 in this test's config): refused by size, before any tokenizing.
    ({"prompt": "1+1=" * 300}, "prompt: 1200 bytes, at most 1000"),
    ({"prompt": "1+1=", "temperature": 1e9}, "temperature: 1000000000.0 is outside [0.0, 100.0]"),
    # Raw request bytes, as a client with its own encoder could send them. A GenerateRequest whose
    # prompt (field 1, wire type 2: tag 0x0A) holds 2 bytes that are not UTF-8: protobuf refuses it
    # while parsing, which gRPC would answer INTERNAL.
    (b"\x0a\x02\xff\xfe", "UTF-8"),
    (b"\x0a\x09\xff", "not a valid chorus.v1.GenerateRequest"),  # a length past the end
]


def _raw_generate(target: str, data: bytes) -> None:
    """Call Generate with request bytes as given (identity serializer) and read the whole stream."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream("/chorus.v1.Coordinator/Generate")  # no serializers: bytes as they are
        list(call(data, timeout=30))


@pytest.mark.parametrize(("kwargs", "field"), BAD_REQUESTS, ids=[f.split(":")[0] for _, f in BAD_REQUESTS])
def test_bad_requests_get_invalid_argument(
    loop: LoopThread, default_workers: dict[str, WorkerProcess], kwargs: dict[str, object] | bytes, field: str
) -> None:
    config = make_config([default_workers["arith-bpe"], default_workers["arith-sp"]], limits={"max_prompt_bytes": 1000})
    with coordinator(loop, config) as target, chorus.Client(target, timeout=30) as client:
        if isinstance(kwargs, bytes):
            with pytest.raises(grpc.RpcError) as raw:
                _raw_generate(target, kwargs)
            assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raw.value.details()
            details = raw.value.details()
        else:
            with pytest.raises(chorus.InvalidArgument) as caught:
                if "conversations" in kwargs:
                    client.generate_batch(**kwargs)  # type: ignore[arg-type]
                else:
                    client.generate(**kwargs)  # type: ignore[arg-type]
            details = caught.value.details
        assert field in details
        assert len(details) < 1000, "an error quotes a bounded part of what was sent"
        assert client.generate(prompt="48+27=", max_new_tokens=4).text == "75"  # still serving


def _chorus(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "chorus.cli", *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kwargs,
    )


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - path: models/arith-bpe\n    scor: 3\n")
    out, _ = _chorus("coordinator", "--config", str(bad)).communicate(timeout=60)
    assert "models[0].scor: unknown key (did you mean 'score'?)" in out


def test_settings_a_running_worker_would_not_read_are_refused_on_the_command_line(tmp_path: Path) -> None:
    """`chorus coordinator --worker`: the workers run already, so how `chorus up` would load them is refused,
    as is --worker where Kubernetes discovery finds the workers."""
    loading = tmp_path / "loading.yaml"
    loading.write_text(f"models:\n  - path: {ROOT / 'models' / 'arith-bpe'}\n    dtype: bfloat16\n")
    run = _chorus("coordinator", "--config", str(loading), "--worker", "arith-bpe=127.0.0.1:1")
    out, _ = run.communicate(timeout=60)
    assert run.returncode != 0
    assert "models[0].dtype: set how `chorus up` loads a model; a --worker was loaded by its own flags" in out
    discovered = tmp_path / "discovered.yaml"
    discovered.write_text("discovery: {mode: kubernetes}\nmodels:\n  - name: arith-bpe\n")
    run = _chorus("coordinator", "--config", str(discovered), "--worker", "arith-bpe=127.0.0.1:1")
    out, _ = run.communicate(timeout=60)
    assert run.returncode != 0
    assert "--worker: the config's discovery.mode is kubernetes, which finds the workers itself" in out


def test_chorus_up_and_generate_from_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "default.yaml"
    shutil.copy(ROOT / "configs" / "default.yaml", config)
    text = config.read_text().replace("../models", str(MODELS))
    config.write_text(text)
    up = _chorus("--log-format", "json", "up", "--config", str(config), "--port", "0")
    try:
        address = None
        deadline = time.monotonic() + 180
        while address is None and time.monotonic() < deadline:
            line = up.stdout.readline()  # type: ignore[union-attr]
            assert line or up.poll() is None, "chorus up exited"
            if line.startswith("chorus serving on "):
                address = line.split()[-1]
        assert address, "chorus up did not report its address"
        gen = _chorus("generate", "--target", address, "--max-new-tokens", "6", "--request-id", "cli-1", "48+27=")
        out, _ = gen.communicate(timeout=60)
        assert gen.returncode == 0, out
        assert out.strip().endswith("75"), out
        models = _chorus("models", "--target", address)
        out, _ = models.communicate(timeout=60)
        assert "arith-bpe" in out and "arith-sp" in out, out
    finally:
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=30)
    records = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    finished = [r for r in records if r.get("request_id") == "cli-1" and "finish_reason" in r]
    assert finished and finished[0]["completion_tokens"] >= 1, rest[-2000:]


def _health_and_services(address: str) -> tuple[int, set[str]]:
    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return status, {s.name for s in response.list_services_response.service}


def test_health_and_reflection_on_both_servers(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> None:
    worker_status, worker_services = _health_and_services(default_workers["arith-bpe"].address)
    assert worker_status == health_pb2.HealthCheckResponse.SERVING
    assert {"chorus.v1.ModelWorker", "grpc.health.v1.Health"} <= worker_services
    with coordinator(loop, make_config([default_workers["arith-bpe"]])) as target:
        status, services = _health_and_services(target)
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert {"chorus.v1.Coordinator", "grpc.health.v1.Health"} <= services


def test_past_capacity_requests_get_resource_exhausted_at_once(
    loop: LoopThread, endless_workers: list[WorkerProcess]
) -> None:
    config = make_config(endless_workers, limits={"max_running": 1})
    # retries=0: the refusal itself is under test (the SDK would retry it by default).
    with coordinator(loop, config) as target, chorus.Client(target, timeout=60, retries=0) as client:
        stream = client.stream(prompt="hello", max_new_tokens=4000)
        next(stream)  # one conversation running: the coordinator is full
        started = time.monotonic()
        with pytest.raises(chorus.ResourceExhausted, match="capacity"):
            client.generate(prompt="hello", max_new_tokens=4)
        assert time.monotonic() - started < 10  # refused, not queued
        stream.close()
        deadline = time.monotonic() + 10
        while True:  # the slot frees once the cancelled stream has wound down
            try:
                assert client.generate(prompt="hello", max_new_tokens=4).usage.completion_tokens == 4
                break
            except chorus.ResourceExhausted:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def test_draining_finishes_running_requests_and_refuses_new_ones(
    loop: LoopThread, endless_workers: list[WorkerProcess]
) -> None:
    config = make_config(endless_workers)
    running = loop.run(start_coordinator(config, [w.address for w in endless_workers], port=0))
    target = f"127.0.0.1:{running.port}"
    with chorus.Client(target, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(client.generate, prompt="hello", max_new_tokens=150)
        deadline = time.monotonic() + 30
        while _active_sessions(endless_workers[0].address) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stopping = asyncio.run_coroutine_threadsafe(running.stop(grace=30), loop.loop)  # what SIGTERM does
        while _health_and_services(target)[0] != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(chorus.Unavailable):
            client.generate(prompt="hello", max_new_tokens=4)
        result = in_flight.result(60)
        stopping.result(60)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 150
