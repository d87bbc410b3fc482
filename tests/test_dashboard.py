"""Every query the chart ships (the Grafana dashboard's panels and variables, the KEDA trigger, any HPA on
a custom metric) names only metrics, and labels, that real servers expose: a coordinator and a worker are
started, sent a request, and scraped."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import chorus
from chorus_local.cluster import WorkerProcess, spawn_worker
from coordinator.config import ModelSpec
from tests.cluster_helpers import MODELS, ROOT
from tests.helm import CHART, render

DASHBOARD = CHART / "dashboards" / "chorus-dashboard.json"
# Labels Prometheus adds to every scraped series (the chart's ServiceMonitor and PodMonitor).
TARGET_LABELS = {"namespace", "pod", "container", "service", "endpoint", "instance", "job"}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SERVING = health_pb2.HealthCheckResponse.SERVING

Exposed = dict[str, set[str]]  # metric name (histogram suffixes stripped) -> its label names


# --------------------------------------------------------------------------- PromQL, as far as the chart uses it

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
_IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression selects on or groups by. Enough of PromQL for queries
    such as `histogram_quantile(0.9, sum by (le) (rate(m_bucket{a=~"$x"}[$__rate_interval]))) > 0`."""
    labels: set[str] = set()
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals: label values, Grafana variables
    for block in re.findall(r"\{([^}]*)\}", text):
        labels.update(re.findall(rf"({_IDENT})\s*(?:=~|!~|!=|=)", block))
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries: durations, $__rate_interval
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels.update(re.findall(_IDENT, clause))
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"(?<![\w:.])\d+(?:ms|[smhdwy])\b", " ", text)  # durations (offset 5m)
    text = re.sub(r"(?<![\w:.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", text)  # numbers
    names = {
        m.group(1)
        for m in re.finditer(rf"({_IDENT})(\s*\()?", text)
        if not m.group(2) and m.group(1) not in _KEYWORDS  # a name followed by "(" is a function
    }
    return names, labels


def base_name(sample: str) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def unknown_in(expr: str, exposed: Exposed) -> list[str]:
    """What expr names that the servers do not expose: metrics, and labels none of its metrics has."""
    names, labels = promql_names(expr)
    problems = [f"metric {n}" for n in sorted(names) if base_name(n) not in exposed]
    known = set(TARGET_LABELS).union(*(exposed.get(base_name(n), set()) for n in names))
    problems += [f"label {label}" for label in sorted(labels - known)]
    return problems


def test_promql_names_finds_what_a_query_selects_on() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model_name) (rate(chorus_x_bucket{namespace=~"$namespace", '
        'reason!="a{b}"}[$__rate_interval]))) / on(pod) group_left sum(chorus_y_total offset 5m) > 1e3'
    )
    assert promql_names(expr) == (
        {"chorus_x_bucket", "chorus_y_total"},
        {"le", "model_name", "namespace", "reason", "pod"},
    )
    exposed = {"chorus_x": {"le", "model_name"}, "chorus_y_total": {"model_name"}}
    assert unknown_in(expr, exposed) == ["label reason"]
    assert unknown_in("sum(rate(chorus_gone_total[5m]))", exposed) == ["metric chorus_gone_total"]
    assert unknown_in('sum by (model) (chorus_x_count{model="a"})', exposed) == ["label model"]


# --------------------------------------------------------------------------- what the servers expose


def _scrape(port: int) -> Exposed:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    exposed: Exposed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                exposed.setdefault(base_name(sample.name), set()).update(sample.labels)
    return exposed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def exposed(
    default_workers: dict[str, WorkerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Exposed]]:
    """What a worker process's and a `chorus coordinator` process's /metrics expose after an ensembled request."""
    worker_port, port, metrics_port = _free_port(), _free_port(), _free_port()
    worker = spawn_worker(
        ModelSpec(name="arith-bpe", path=str(MODELS / "arith-bpe")), threads=1, metrics_port=worker_port
    )
    members = [worker, default_workers["arith-sp"]]
    config = tmp_path_factory.mktemp("dashboard") / "config.yaml"
    models = [{"name": w.spec.name, "path": w.spec.path, "address": w.address} for w in members]
    config.write_text(yaml.safe_dump({"models": models, "strategy": "gac"}))
    command = [
        sys.executable,
        "-m",
        "chorus.cli",
        "coordinator",
        "--config",
        str(config),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_serving(f"127.0.0.1:{port}", process)
        with chorus.Client(f"127.0.0.1:{port}", timeout=60) as client:
            client.generate(prompt="48+27=", max_new_tokens=4)
        yield {"worker": _scrape(worker_port), "coordinator": _scrape(metrics_port)}
    finally:
        process.terminate()
        process.wait(30)
        worker.stop()


def _wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None, "the coordinator exited"
            assert time.monotonic() < deadline, "the coordinator did not serve"
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)


def _chorus_only(exposed: Exposed) -> Exposed:
    return {name: labels for name, labels in exposed.items() if name.startswith("chorus_")}


def test_the_servers_expose_what_the_readme_lists(exposed: dict[str, Exposed]) -> None:
    """The scrape is not vacuous: the metrics the dashboard is built on are there, labelled by model."""
    coordinator_metrics, worker_metrics = _chorus_only(exposed["coordinator"]), _chorus_only(exposed["worker"])
    assert {
        "chorus_request_failures_total",
        "chorus_e2e_request_latency_seconds",
        "chorus_request_prompt_tokens",
        "chorus_request_generation_tokens",
    } <= coordinator_metrics.keys()
    assert {"chorus_worker_kv_usage_ratio", "chorus_worker_queue_depth"} <= worker_metrics.keys()
    assert all("model_name" in labels for labels in [*coordinator_metrics.values(), *worker_metrics.values()])
    assert not worker_metrics.keys() & coordinator_metrics.keys()


# --------------------------------------------------------------------------- the dashboard


def _exprs(node: Any) -> Iterator[str]:
    """Every `expr` in the dashboard JSON, wherever it is (panels, rows, nested panels)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def _both(exposed: dict[str, Exposed]) -> Exposed:
    merged: Exposed = {}
    for side in exposed.values():
        for name, labels in side.items():
            merged.setdefault(name, set()).update(labels)
    return merged


def test_every_dashboard_query_names_exposed_metrics_and_labels(exposed: dict[str, Exposed]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    every = _both(exposed)
    exprs = list(_exprs(dashboard["panels"]))
    assert len(exprs) >= sum(len(p["targets"]) for p in dashboard["panels"]) > 0
    used: set[str] = set()
    for expr in exprs:
        assert not unknown_in(expr, every), f"{expr}: {unknown_in(expr, every)}"
        used |= {base_name(n) for n in promql_names(expr)[0]}
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
    # The variables' label_values(selector, label) queries.
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        if isinstance(query, dict):
            found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query["query"])
            assert found, query
            selector, label = found.groups()
            assert not unknown_in(selector, every), query
            (name,) = promql_names(selector)[0]
            assert label in every[base_name(name)] | TARGET_LABELS, query
            used.add(base_name(name))
    # The new metrics are charted.
    assert {
        "chorus_request_failures_total",
        "chorus_e2e_request_latency_seconds",
        "chorus_request_prompt_tokens",
        "chorus_request_generation_tokens",
        "chorus_worker_kv_usage_ratio",
    } <= used
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in (
        "latency",
        "1 h",
        "failures by reason",
        "throughput",
        "ensemble rate",
        "agreement",
        "prompt tokens",
        "generation tokens",
        "kv-cache usage",
        "worker",
    ):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_coordinator_panels_select_the_ensemble_and_worker_panels_the_workers_model(
    exposed: dict[str, Exposed],
) -> None:
    """Each query filters on model_name with the variable of its side: $model_name on coordinator series
    (whose model_name is the ensemble's id), $worker_model on worker series (the worker's model)."""
    coordinator_metrics, worker_metrics = exposed["coordinator"], exposed["worker"]
    for expr in _exprs(json.loads(DASHBOARD.read_text())["panels"]):
        names = {base_name(n) for n in promql_names(expr)[0]}
        assert names <= coordinator_metrics.keys() or names <= worker_metrics.keys(), expr
        variable = "$model_name" if names <= coordinator_metrics.keys() else "$worker_model"
        for selector in re.findall(r"\{[^}]*\}", expr):
            assert f'model_name=~"{variable}"' in selector and 'namespace=~"$namespace"' in selector, expr


# --------------------------------------------------------------------------- the chart's autoscaler queries


def _autoscaler_queries(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(object, query) for each KEDA prometheus trigger and each HPA metric that is not a resource (CPU,
    memory): those name a metric an adapter serves from Prometheus."""
    queries = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ScaledObject":
            for trigger in doc["spec"]["triggers"]:
                assert trigger["type"] == "prometheus", name
                queries.append((name, trigger["metadata"]["query"]))
        elif doc["kind"] == "HorizontalPodAutoscaler":
            for metric in doc["spec"].get("metrics", []):
                kind = metric["type"]
                if kind not in ("Resource", "ContainerResource"):
                    key = kind[0].lower() + kind[1:]  # pods, object, external
                    queries.append((name, metric[key]["metric"]["name"]))
    return queries


def test_the_charts_autoscaler_queries_name_exposed_metrics(helm: str, exposed: dict[str, Exposed]) -> None:
    worker = exposed["worker"]
    docs = render(helm, "-f", str(CHART / "ci" / "gpu-values.yaml"))  # KEDA on the workers' queue depth
    docs += render(helm, "--set", "worker.autoscaling.enabled=true", "--set", "coordinator.autoscaling.enabled=true")
    queries = _autoscaler_queries(docs)
    keda = [(name, q) for name, q in queries if name.startswith("ScaledObject/")]
    assert len(keda) == 2, queries  # one per model of gpu-values.yaml
    for name, query in queries:
        assert not unknown_in(query, _both(exposed)), f"{name}: {query}: {unknown_in(query, _both(exposed))}"
    for name, query in keda:  # the worker's own series, selected by its model's name (the worker's --name)
        assert promql_names(query)[0] == {"chorus_worker_queue_depth"} <= worker.keys(), query
        model = name.removeprefix("ScaledObject/chorus-")
        assert f'model_name="{model}"' in query and 'namespace="ml"' in query, query
        (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"chorus-{model}"]
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--name") + 1] == model
