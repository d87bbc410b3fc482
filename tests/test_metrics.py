"""Prometheus metrics, scraped over HTTP from a worker process and from the coordinator."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

import chorus
from chorus.lifecycle import serve_metrics
from coordinator.cluster import WorkerProcess, spawn_worker
from coordinator.config import ModelSpec
from tests.cluster_helpers import MODELS, LoopThread, coordinator, make_config


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
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


def test_worker_metrics(loop: LoopThread) -> None:
    port = _free_port()
    worker = spawn_worker(ModelSpec(name="arith-bpe", path=str(MODELS / "arith-bpe")), threads=1, metrics_port=port)
    try:
        label = (("model", "arith-bpe"),)
        before = _scrape(port)
        assert before[("chorus_worker_sessions", label)] == 0
        with coordinator(loop, make_config([worker])) as target, chorus.Client(target, timeout=60) as client:
            result = client.generate(prompt="48+27=", max_new_tokens=4)
        after = _scrape(port)
        passes = after[("chorus_worker_forward_seconds_count", label)]
        assert passes == sum(m.forward_passes for m in result.usage.models) > 0
        assert after[("chorus_worker_batch_size_count", label)] == passes
        assert after[("chorus_worker_sessions", label)] == 0
        assert after[("chorus_worker_kv_cache_bytes", label)] == 0
    finally:
        worker.stop()


def test_coordinator_metrics(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> None:
    port = serve_metrics("127.0.0.1", 0)
    config = make_config([default_workers["arith-bpe"], default_workers["arith-sp"]], strategy="gac")
    gac = (("strategy", "gac"),)
    before = _scrape(port)
    with coordinator(loop, config) as target, chorus.Client(target, timeout=60) as client:
        result = client.generate(prompt="48+27=", max_new_tokens=4)
    after = _scrape(port)

    def grew(name: str, labels: tuple[tuple[str, str], ...] = gac) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert grew("chorus_steps_total") == result.usage.steps
    assert grew("chorus_steps_ensembled_total") == result.usage.steps_ensembled == result.usage.steps
    assert grew("chorus_generation_tokens_total") == result.usage.completion_tokens
    assert grew("chorus_time_to_first_token_seconds_count") == 1
    assert grew("chorus_inter_token_latency_seconds_count") == result.usage.completion_tokens - 1
    assert grew("chorus_e2e_request_latency_seconds_count", (("finish_reason", "stop"), *gac)) == 1
    agreed = 0.0
    for model in ("arith-bpe", "arith-sp"):
        labels = (("model", model), *gac)
        assert grew("chorus_model_steps_total", labels) == result.usage.steps
        assert 0 <= grew("chorus_model_agreement_total", labels) <= result.usage.steps
        agreed += grew("chorus_model_agreement_total", labels)
    assert agreed > 0  # on an easy sum the members mostly pick the chosen token
    assert after[("chorus_requests_running", ())] == 0
