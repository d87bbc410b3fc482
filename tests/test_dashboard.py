"""The Grafana dashboard charts only metrics the servers really export."""

from __future__ import annotations

import json
import re

from prometheus_client.metrics import MetricWrapperBase

import coordinator.metrics
import model_worker.metrics
from tests.cluster_helpers import ROOT

DASHBOARD = ROOT / "deploy" / "helm" / "chorus" / "dashboards" / "chorus-dashboard.json"


_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def _exported_names() -> set[str]:
    """Every sample name the coordinator's and workers' metrics can expose."""
    names: set[str] = set()
    for module in (coordinator.metrics, model_worker.metrics):
        for metric in vars(module).values():
            if isinstance(metric, MetricWrapperBase):
                for family in metric.describe():
                    names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def test_every_dashboard_query_uses_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _exported_names()
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used.update(re.findall(r"\bchorus_[a-z0-9_]+", target["expr"]))
    assert used, "no chorus metric charted"
    unknown = used - exported
    assert not unknown, f"the dashboard charts metrics nobody exports: {sorted(unknown)}"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("latency", "throughput", "ensemble rate", "agreement", "worker"):
        assert topic in titles
