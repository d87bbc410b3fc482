"""Prometheus metrics, scraped over HTTP from a worker process and from the coordinator."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import chorus
from chorus.v1 import worker_pb2
from chorus_common.lifecycle import serve_metrics
from chorus_common.types import Prompt
from chorus_local.cluster import RunningCoordinator, WorkerProcess, spawn_worker, start_coordinator
from coordinator.config import ModelSpec
from coordinator.metrics import FAILURE_REASONS, MODEL_NAME
from coordinator.workers import Transport, WorkerClient
from tests.cluster_helpers import MODELS, LoopThread, coordinator, make_config
from tests.tiny_models import never_ending_llama

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]
ENSEMBLE = (("model_name", MODEL_NAME),)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """This process's metrics endpoint: the in-thread coordinators' metrics, as `chorus coordinator` serves them."""
    return serve_metrics("127.0.0.1", 0)


# --------------------------------------------------------------------------- worker


def test_worker_metrics(loop: LoopThread) -> None:
    port = _free_port()
    options = {"max_model_len": 64, "max_sessions": 2}  # a KV pool of 2 sessions x 64 tokens (8 blocks)
    spec = ModelSpec(name="arith-bpe", path=str(MODELS / "arith-bpe"))
    worker = spawn_worker(spec, threads=1, metrics_port=port, options=options)
    try:
        label = (("model_name", "arith-bpe"),)
        before = scrape(port)
        assert before[("chorus_worker_sessions", label)] == 0
        assert before[("chorus_worker_kv_usage_ratio", label)] == 0

        # A session held open: the KV gauges show the blocks it holds, as a fraction of the pool.
        fed, info, during = loop.run(_with_a_session_open(worker.address, lambda: scrape(port)))
        assert (info.max_sessions, info.context_length, info.kv_blocks) == (2, 64, 8) and fed > 1
        assert during[("chorus_worker_sessions", label)] == 1
        held = -(-fed // info.kv_block_size)
        assert during[("chorus_worker_kv_usage_ratio", label)] == pytest.approx(held / info.kv_blocks)
        assert during[("chorus_worker_kv_cache_bytes", label)] == info.kv_cache_bytes > 0
        assert during[("chorus_worker_kv_prefix_cached_bytes", label)] == 0
        _wait_for(lambda: scrape(port)[("chorus_worker_kv_usage_ratio", label)] == 0, "the session's KV was not freed")
        # Its full blocks stay cached for a later prefix hit (the partial last one is freed): their memory shows.
        per_block = info.kv_cache_bytes // held
        cached = scrape(port)[("chorus_worker_kv_prefix_cached_bytes", label)]
        assert fed // info.kv_block_size >= 1 and cached == (fed // info.kv_block_size) * per_block

        before = scrape(port)
        with coordinator(loop, make_config([worker])) as target, chorus.Client(target, timeout=60) as client:
            result = client.generate(prompt="48+27=", max_new_tokens=4)
        after = scrape(port)
        passes = (
            after[("chorus_worker_forward_seconds_count", label)]
            - before[("chorus_worker_forward_seconds_count", label)]
        )
        assert passes == sum(m.forward_passes for m in result.usage.models) > 0
        assert (
            after[("chorus_worker_batch_size_count", label)] - before[("chorus_worker_batch_size_count", label)]
            == passes
        )
        # Every pass timed phase by phase (pass_clock.py): the host's phases once each (on a CPU, no device ones).
        for phase in ("dispatch", "prepare", "forward", "rows", "return"):
            key = (("model_name", "arith-bpe"), ("phase", phase))
            count = "chorus_worker_pass_phase_seconds_count"
            assert after[(count, key)] - before.get((count, key), 0) == passes, phase
        assert not any(dict(labels).get("phase") in ("wait", "device") for _, labels in after)
        assert after[("chorus_worker_sessions", label)] == 0
        assert after[("chorus_worker_kv_cache_bytes", label)] == 0
        assert after[("chorus_worker_kv_usage_ratio", label)] == 0
        for name, labels in after:
            if name.startswith("chorus_"):
                assert dict(labels).keys() <= {"model_name", "le", "phase"}, name
                assert ("model_name", "arith-bpe") in labels, name
    finally:
        worker.stop()


async def _with_a_session_open(address: str, read: Callable[[], Samples]) -> tuple[int, Any, Samples]:
    """Open a session and feed its prompt; (tokens fed, the worker's Info, the metrics) while it is open."""
    client = WorkerClient(address)
    session = client.session(30)
    try:
        await session.open(Prompt(text="1+2=3\n4+5=9\n6+7="), "kv-metrics")
        step = await session.step(b"", Transport(top_k=5, half=False))
        info = await client.stub.Info(worker_pb2.InfoRequest())
        return step.tokens_fed, info, read()
    finally:
        session.cancel()
        await client.close()


# --------------------------------------------------------------------------- coordinator


def test_coordinator_metrics(loop: LoopThread, default_workers: dict[str, WorkerProcess], metrics_port: int) -> None:
    config = make_config([default_workers["arith-bpe"], default_workers["arith-sp"]], strategy="gac")
    gac = (*ENSEMBLE, ("strategy", "gac"))
    before = scrape(metrics_port)
    with coordinator(loop, config) as target, chorus.Client(target, timeout=60) as client:
        result = client.generate(prompt="48+27=", max_new_tokens=4)
    after = scrape(metrics_port)

    def grew(name: str, labels: Labels = gac) -> float:
        labels = tuple(sorted(labels))
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    usage = result.usage
    assert grew("chorus_steps_total") == usage.steps
    assert grew("chorus_steps_ensembled_total") == usage.steps_ensembled == usage.steps
    assert grew("chorus_generation_tokens_total") == usage.completion_tokens
    assert grew("chorus_time_to_first_token_seconds_count") == 1
    assert grew("chorus_inter_token_latency_seconds_count") == usage.completion_tokens - 1
    assert grew("chorus_e2e_request_latency_seconds_count", (("finish_reason", "stop"), *gac)) == 1
    # Per request (vLLM's vllm:request_prompt_tokens / vllm:request_generation_tokens): the prompt as
    # the OpenAI API's usage counts it (its longest member tokenization), and the chosen tokens.
    prompt_tokens = max(m.prompt_tokens for m in usage.models)
    assert prompt_tokens > 0
    assert grew("chorus_request_prompt_tokens_count", ENSEMBLE) == 1
    assert grew("chorus_request_prompt_tokens_sum", ENSEMBLE) == prompt_tokens
    assert grew("chorus_request_generation_tokens_count", ENSEMBLE) == 1
    assert grew("chorus_request_generation_tokens_sum", ENSEMBLE) == usage.completion_tokens > 0
    for name, n in (
        ("chorus_request_prompt_tokens", prompt_tokens),
        ("chorus_request_generation_tokens", usage.completion_tokens),
    ):
        in_bucket = {le: grew(f"{name}_bucket", (*ENSEMBLE, ("le", le))) for le in ("1.0", "2.0", "5.0", "+Inf")}
        assert in_bucket == {le: float(n <= float(le)) for le in in_bucket}, name
    agreed = 0.0
    for model, member_usage in zip(("arith-bpe", "arith-sp"), usage.models, strict=True):
        member = (("member", model), *ENSEMBLE)
        assert grew("chorus_prompt_tokens_total", member) == member_usage.prompt_tokens > 0
        assert grew("chorus_model_steps_total", (*member, ("strategy", "gac"))) == usage.steps
        # Each step that ran a forward pass reports its worker's queue time (a cached step runs none).
        assert 0 < grew("chorus_member_queue_seconds_count", member) <= usage.steps
        assert grew("chorus_member_queue_seconds_sum", member) >= 0
        assert 0 <= grew("chorus_model_agreement_total", (*member, ("strategy", "gac"))) <= usage.steps
        agreed += grew("chorus_model_agreement_total", (*member, ("strategy", "gac")))
    assert agreed > 0  # on an easy sum the members mostly pick the chosen token
    assert after[("chorus_requests_running", ENSEMBLE)] == 0
    # Every coordinator series names its model (vLLM dashboards select on model_name), and every series
    # this request grew names the ensemble (other tests of the session may have grown members' series).
    for name, labels in after:
        if name.startswith("chorus_"):
            assert any(key == "model_name" for key, _ in labels), (name, labels)
            if after[(name, labels)] != before.get((name, labels), 0.0):
                assert ("model_name", MODEL_NAME) in labels, (name, labels)


def test_latency_buckets_reach_an_hour(metrics_port: int) -> None:
    samples = scrape(metrics_port)

    def top_bucket(name: str) -> float:
        les = {dict(labels)["le"] for n, labels in samples if n == f"{name}_bucket"}
        assert les, f"{name}: no buckets exported"
        return max(float(le) for le in les if le != "+Inf")

    assert top_bucket("chorus_e2e_request_latency_seconds") == 3600
    assert top_bucket("chorus_time_to_first_token_seconds") >= 600
    assert top_bucket("chorus_inter_token_latency_seconds") >= 60
    assert top_bucket("chorus_request_prompt_tokens") >= 100_000


def test_model_name_is_the_model_the_request_named(
    loop: LoopThread, default_workers: dict[str, WorkerProcess], metrics_port: int
) -> None:
    """The ensemble's id (what /v1/models lists first), or a member's name for a request to that member alone;
    a name nobody serves is never a label value (its failure is the ensemble's)."""
    workers = [default_workers["arith-bpe"], default_workers["arith-sp"]]
    config = make_config(workers, http={"enabled": True, "port": 0})
    running = loop.run(start_coordinator(config, [w.address for w in workers], port=0))
    try:
        assert running.http is not None
        base = f"http://127.0.0.1:{running.http.port}"
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as response:
            assert json.loads(response.read())["data"][0]["id"] == MODEL_NAME
        alone = (("model_name", "arith-sp"),)
        before = scrape(metrics_port)
        with chorus.Client(f"127.0.0.1:{running.port}", timeout=60, retries=0) as client:
            client.generate(prompt="48+27=", max_new_tokens=4, model="arith-sp")
            with pytest.raises(chorus.InvalidArgument):
                client.generate(prompt="48+27=", max_new_tokens=4, model="arith-sp", temperature=-1.0)
            with pytest.raises(chorus.InvalidArgument):
                client.generate(prompt="48+27=", max_new_tokens=4, model="no-such-model")
        body = json.dumps({"model": "arith-sp", "prompt": "1+1=", "temperature": -1.0}).encode()
        assert _post(base, "/v1/completions", body)[0] == 400
        body = json.dumps({"model": "no-such-model", "prompt": "1+1="}).encode()
        assert _post(base, "/v1/completions", body)[0] == 404
        after = scrape(metrics_port)
    finally:
        loop.run(running.stop(grace=0))

    def grew(name: str, labels: Labels) -> float:
        labels = tuple(sorted(labels))
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert grew("chorus_request_generation_tokens_count", alone) == 1
    assert grew("chorus_request_generation_tokens_count", ENSEMBLE) == 0
    assert grew("chorus_model_steps_total", (*alone, ("member", "arith-sp"), ("strategy", "gac"))) > 0
    assert grew("chorus_model_steps_total", (*alone, ("member", "arith-bpe"), ("strategy", "gac"))) == 0
    assert grew("chorus_request_failures_total", (*alone, ("reason", "invalid"))) == 2  # gRPC and HTTP
    assert grew("chorus_request_failures_total", (*ENSEMBLE, ("reason", "invalid"))) == 2  # the unknown names
    assert not any("no-such-model" in dict(labels).values() for _, labels in after)


# --------------------------------------------------------------------------- failures by reason


@pytest.fixture(scope="module")
def endless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return never_ending_llama(tmp_path_factory.mktemp("endless"), MODELS / "arith-sp", context=4096)


class _Worker:
    """An in-process worker (so a test can make its forward pass raise, or stop it mid-request)."""

    def __init__(self, loop: LoopThread, path: Path) -> None:
        from model_worker.loading import load_model
        from model_worker.runtime import Runtime
        from model_worker.server import WorkerServer

        async def start() -> tuple[WorkerServer, Runtime]:
            server = WorkerServer("127.0.0.1:0")
            await server.start()
            runtime = Runtime(load_model(str(path)))
            await server.ready(runtime)
            return server, runtime

        self.loop = loop
        self.stopped = False
        self.server, self.runtime = loop.run(start())
        spec = ModelSpec(name="endless", path=str(path))
        self.process = WorkerProcess(spec, None, f"127.0.0.1:{self.server.port}")  # type: ignore[arg-type]

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.loop.run(self.server.stop(grace=0))


@pytest.fixture()
def served(loop: LoopThread, endless: Path) -> Iterator[tuple[RunningCoordinator, _Worker]]:
    """A coordinator (gRPC and HTTP, room for one conversation) over an in-process worker."""
    worker = _Worker(loop, endless)
    config = make_config([worker.process], http={"enabled": True, "port": 0}, limits={"max_running": 1})
    try:
        running = loop.run(start_coordinator(config, [worker.process.address], port=0))
        try:
            yield running, worker
        finally:
            loop.run(running.stop(grace=0))
    finally:
        worker.stop()


def _failures(port: int) -> dict[str, float]:
    samples = scrape(port)
    return {r: samples[("chorus_request_failures_total", (*ENSEMBLE, ("reason", r)))] for r in FAILURE_REASONS}


class _Counted:
    """Failures counted since the last check, by reason (only the reasons that grew)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.last = _failures(port)

    def since(self) -> dict[str, float]:
        now = _failures(self.port)
        grown = {r: now[r] - self.last[r] for r in FAILURE_REASONS if now[r] != self.last[r]}
        self.last = now
        return grown

    def awaited(self, reason: str) -> dict[str, float]:
        """As since(), once `reason` has grown (counted as the server winds the request down)."""
        _wait_for(lambda: _failures(self.port)[reason] > self.last[reason], f"no {reason} failure counted")
        time.sleep(0.1)  # nothing else is counted after it
        return self.since()


def _post(base: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"{base}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_grpc_failures_are_counted_once_by_reason(
    loop: LoopThread, served: tuple[RunningCoordinator, _Worker], metrics_port: int
) -> None:
    running, worker = served
    counted = _Counted(metrics_port)
    long = {"prompt": "hello", "max_new_tokens": 4000}
    with chorus.Client(f"127.0.0.1:{running.port}", timeout=60, retries=0) as client:
        assert client.generate(prompt="hello", max_new_tokens=3).finish_reason == "length"
        assert counted.since() == {}  # a success is no failure

        with pytest.raises(chorus.InvalidArgument):
            client.generate(prompt="1+1=", temperature=-1.0)
        assert counted.since() == {"invalid": 1}
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel, pytest.raises(grpc.RpcError) as raw:
            list(channel.unary_stream("/chorus.v1.Coordinator/Generate")(b"\x0a\x09\xff", timeout=30))  # not protobuf
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert counted.since() == {"invalid": 1}

        stream = client.stream(**long)
        next(stream)  # one conversation running: the coordinator is full
        with pytest.raises(chorus.ResourceExhausted):
            client.generate(prompt="hello", max_new_tokens=4)
        assert counted.since() == {"overloaded": 1}
        stream.close()  # the client goes away
        assert counted.awaited("cancelled") == {"cancelled": 1}

        with pytest.raises(chorus.DeadlineExceeded):
            client.generate(**long, timeout=1.0)
        assert counted.awaited("deadline") == {"deadline": 1}

        running.server.admission.draining = True
        with pytest.raises(chorus.Unavailable, match="shutting down"):
            client.generate(prompt="hello", max_new_tokens=4)
        running.server.admission.draining = False
        assert counted.since() == {"draining": 1}

        loop.run(running.ensemble.remove_worker("endless", worker.process.address))
        with pytest.raises(chorus.Unavailable, match="no ready worker"):
            client.generate(prompt="hello", max_new_tokens=4)
        loop.run(running.ensemble.add_worker("endless", worker.process.address))
        assert counted.since() == {"not_ready": 1}

        healthy = worker.runtime.engine._run
        worker.runtime.engine._run = _broken  # type: ignore[method-assign]
        with pytest.raises(chorus.ChorusError) as caught:
            client.generate(prompt="hello", max_new_tokens=4)
        worker.runtime.engine._run = healthy  # type: ignore[method-assign]
        assert caught.value.code == grpc.StatusCode.INTERNAL
        assert counted.since() == {"worker_failed": 1}

        stream = client.stream(**long)
        next(stream)
        worker.stop()  # its sessions end with it: drained, not lost
        with pytest.raises(chorus.Unavailable, match="shutting down"):
            list(stream)
        assert counted.since() == {"worker_draining": 1}


def _broken(*args: Any) -> Any:
    raise RuntimeError("the forward pass blew up")


def test_http_failures_are_counted_once_by_reason(
    loop: LoopThread, served: tuple[RunningCoordinator, _Worker], metrics_port: int
) -> None:
    running, worker = served
    assert running.http is not None
    base = f"http://127.0.0.1:{running.http.port}"
    counted = _Counted(metrics_port)

    def completion(**body: Any) -> int:
        return _post(base, "/v1/completions", json.dumps({"model": "chorus", "prompt": "hello", **body}).encode())[0]

    assert completion(max_tokens=3) == 200
    assert counted.since() == {}

    assert _post(base, "/v1/completions", b"{not json")[0] == 400
    assert counted.since() == {"invalid": 1}
    assert completion(temperature=-1.0) == 400  # refused by the same validation as gRPC's
    assert counted.since() == {"invalid": 1}
    assert completion(prompt=["hello", "hi"], max_tokens=3) == 429  # two conversations, room for one
    assert counted.since() == {"overloaded": 1}

    running.server.admission.draining = True
    assert completion(max_tokens=3) == 503
    running.server.admission.draining = False
    assert counted.since() == {"draining": 1}

    loop.run(running.ensemble.remove_worker("endless", worker.process.address))
    assert completion(max_tokens=3) == 503
    loop.run(running.ensemble.add_worker("endless", worker.process.address))
    assert counted.since() == {"not_ready": 1}

    healthy = worker.runtime.engine._run
    worker.runtime.engine._run = _broken  # type: ignore[method-assign]
    assert completion(max_tokens=3) == 500
    worker.runtime.engine._run = healthy  # type: ignore[method-assign]
    assert counted.since() == {"worker_failed": 1}

    # A streaming client that goes away after its first chunk.
    connection = http.client.HTTPConnection("127.0.0.1", running.http.port, timeout=60)
    body = json.dumps({"model": "chorus", "prompt": "hello", "max_tokens": 4000, "stream": True})
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()
    response.close()
    assert counted.awaited("cancelled") == {"cancelled": 1}

    worker.stop()
    assert completion(max_tokens=3) == 503  # its worker is gone: lost on the first call to it
    assert counted.since() == {"worker_lost": 1}

    with pytest.raises(urllib.error.HTTPError) as not_found:  # aiohttp's own answer: not an ensemble request
        urllib.request.urlopen(f"{base}/no-such-path", timeout=10)
    assert not_found.value.code == 404
    assert counted.since() == {}
