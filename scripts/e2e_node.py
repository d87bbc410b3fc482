"""One emulated Kubernetes node for `make e2e`: the chart's rendered pods run as docker containers.

What a kubelet, the API server and the Deployment controller do, as far as the chart's workloads need:

* the API: a Kubernetes API emulator (kmock) on 127.0.0.1 holding the pods, which the coordinator's
  discovery lists and watches with the real client (it reads a kubeconfig, not the in-cluster token);
* the pods: a container per pod with what its spec says: image, args, env, user and group, read-only
  root, dropped capabilities, no privilege escalation, memory limit, restart policy Always; emptyDir as
  tmpfs, hostPath, ConfigMap and Secret volumes as bind mounts (read-only where the spec says so);
* the probes: the spec's gRPC startup, readiness and liveness checks, with its periods, timeouts and
  thresholds; a container that fails them is restarted, and readiness is written to the pod's status;
* deletion as the kubelet does it: SIGTERM, the grace period, the pod gone; its deletionTimestamp
  reaches discovery half a second after the kubelet acted (the worst order of the two watches); a
  rolling restart replaces one pod at a time (maxSurge 0).

Where it differs: every container shares the host's network (docker without a bridge), so each pod gets
its own loopback address 127.0.0.N as its pod IP, and the 0.0.0.0 its args and config bind becomes that
address. There is no CNI, no Service and no scheduler: the test dials pod IPs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kmock import KubernetesEmulator, Server
from kubernetes import client

log = logging.getLogger("e2e.node")
LABEL = "chorus-e2e"  # every container this node runs carries it (a stale one is removed at start)
_HOLD = "chorus.dev/e2e-kubelet"  # the finalizer that keeps a deleted pod while its container stops
_SIZE = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti)?$")
_UNITS = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def docker(*args: str, check: bool = True, timeout: float = 120.0) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])}: {out.stderr.strip()}")
    return out.stdout.strip()


def _bytes(quantity: str) -> int:
    match = _SIZE.match(str(quantity))
    if not match:
        raise ValueError(f"unsupported quantity {quantity!r}")
    return int(match[1]) * _UNITS[match[2]]


class _Loop:
    """An asyncio loop in a thread, for the API emulator."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="e2e-api", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@dataclass
class Probe:
    service: str
    port: int
    period: float
    timeout: float
    failures: int

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Probe:
        if "grpc" not in spec:
            raise ValueError(f"only gRPC probes are emulated, not {sorted(spec)}")
        return cls(
            service=spec["grpc"].get("service", ""),
            port=int(spec["grpc"]["port"]),
            period=float(spec.get("periodSeconds", 10)),
            timeout=float(spec.get("timeoutSeconds", 1)),
            failures=int(spec.get("failureThreshold", 3)),
        )

    def check(self, ip: str) -> bool:
        """The kubelet's gRPC probe: a fresh connection, Health.Check(service), SERVING within the timeout."""
        with grpc.insecure_channel(f"{ip}:{self.port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=self.service), timeout=self.timeout
                )
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class Pod:
    name: str
    deployment: str
    ip: str
    labels: dict[str, str]
    spec: dict[str, Any]  # the Deployment's pod template spec
    ready: bool = False
    restarts: int = 0
    deleting: bool = False
    gone: threading.Event = field(default_factory=threading.Event)
    runs: int = 0  # container starts seen (a restart makes the kubelet probe it from the start again)

    @property
    def container(self) -> dict[str, Any]:
        return self.spec["containers"][0]

    def port(self, name: str) -> int:
        return next(int(p["containerPort"]) for p in self.container["ports"] if p["name"] == name)

    def address(self, port_name: str = "grpc") -> str:
        return f"{self.ip}:{self.port(port_name)}"


class Node:
    """The rendered manifests' Deployments as pods on this machine (see the module's docstring)."""

    def __init__(self, manifests: list[dict[str, Any]], secrets: dict[str, dict[str, str]], scratch: Path) -> None:
        self.docs = manifests
        self.secrets = secrets
        self.scratch = scratch
        self.deployments = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "Deployment"}
        self.config_maps = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "ConfigMap"}
        self.namespace = next(iter(self.deployments.values()))["metadata"]["namespace"]
        self.pods: dict[str, Pod] = {}
        self._ips = (f"127.0.0.{n}" for n in itertools.count(11))
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._api_loop = _Loop()
        self._stack, url = self._api_loop.run(self._start_api())
        configuration = client.Configuration()
        configuration.host = url
        self._api_client = client.ApiClient(configuration)
        self.api = client.CoreV1Api(self._api_client)
        self.kubeconfig = self._write_kubeconfig(url)
        self._events = threading.Thread(target=self._watch_containers, name="e2e-events", daemon=True)
        self._event_stream: subprocess.Popen[str] | None = None

    # --- the API -----------------------------------------------------------------------------------

    async def _start_api(self) -> tuple[AsyncExitStack, str]:
        stack = AsyncExitStack()
        emulator = await stack.enter_async_context(KubernetesEmulator())
        server = await stack.enter_async_context(Server(emulator))
        return stack, str(server.url).rstrip("/")

    def _write_kubeconfig(self, url: str) -> Path:
        folder = self.scratch / "kube"
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {"server": url}}],
            "users": [{"name": "e2e", "user": {"token": "e2e"}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e", "namespace": self.namespace}}],
            "current-context": "e2e",
        }
        (folder / "config").write_text(json.dumps(config))
        (folder / "config").chmod(0o644)
        folder.chmod(0o755)
        return folder / "config"

    def _publish(self, pod: Pod) -> None:
        """The pod's status as the kubelet reports it."""
        image = pod.container["image"]
        container = {
            "name": pod.container["name"],
            "ready": pod.ready,
            "restartCount": pod.restarts,
            "image": image,
            "imageID": image,
        }
        status = {"containerStatuses": [container]}
        try:
            self.api.patch_namespaced_pod(pod.name, self.namespace, {"status": status})
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    # --- pods --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Remove what an earlier run left, then every Deployment's replicas."""
        stale = docker("ps", "-aq", "--filter", f"label={LABEL}")
        if stale:
            docker("rm", "-fv", *stale.split())
        self._events.start()
        for name, deployment in self.deployments.items():
            for _ in range(int(deployment["spec"].get("replicas", 1))):
                self.create_pod(name)

    def create_pod(self, deployment: str) -> Pod:
        template = self.deployments[deployment]["spec"]["template"]
        with self._lock:
            pod = Pod(
                f"{deployment}-{next(self._names)}",
                deployment,
                next(self._ips),
                dict(template["metadata"]["labels"]),
                template["spec"],
            )
            self.pods[pod.name] = pod
        ports = [{"name": p["name"], "containerPort": int(p["containerPort"])} for p in pod.container["ports"]]
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": self.namespace, "labels": pod.labels, "finalizers": [_HOLD]},
            "spec": {"containers": [{"name": pod.container["name"], "image": pod.container["image"], "ports": ports}]},
            "status": {"podIP": pod.ip},
        }
        self.api.create_namespaced_pod(self.namespace, body)
        self._publish(pod)
        self._run_container(pod)
        threading.Thread(target=self._kubelet, args=(pod,), name=f"kubelet-{pod.name}", daemon=True).start()
        log.info("pod %s (%s) created", pod.name, pod.ip)
        return pod

    def _run_container(self, pod: Pod) -> None:
        spec, container = pod.spec, pod.container
        security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
        args = [
            "run",
            "-d",
            "--name",
            pod.name,
            "--label",
            LABEL,
            "--network",
            "host",
            "--restart",
            "always",  # the pod's restartPolicy (Always, the default of a Deployment's pods)
            "--stop-timeout",
            str(spec.get("terminationGracePeriodSeconds", 30)),
        ]
        if "runAsUser" in security:
            args += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
        if "fsGroup" in security:
            args += ["--group-add", str(security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        for cap in security.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        # seccompProfile RuntimeDefault is docker's default profile.
        memory = container.get("resources", {}).get("limits", {}).get("memory")
        if memory:
            args += ["--memory", str(_bytes(memory))]
        for env in container.get("env", []):
            args += ["--env", f"{env['name']}={env['value']}"]
        if spec.get("serviceAccountName") and spec.get("automountServiceAccountToken", True):
            # What the kubelet mounts for the API (here a kubeconfig, not the in-cluster token and CA).
            args += [
                "--volume",
                f"{self.kubeconfig.parent}:/var/run/chorus-e2e-kube:ro",
                "--env",
                "KUBECONFIG=/var/run/chorus-e2e-kube/config",
            ]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            args += self._mount(pod, volumes[mount["name"]], mount, security)
        image_args = [a.replace("0.0.0.0", pod.ip) for a in container.get("args", [])]
        docker(*args, container["image"], *image_args)

    def _mount(self, pod: Pod, volume: dict[str, Any], mount: dict[str, Any], security: dict[str, Any]) -> list[str]:
        target, ro = mount["mountPath"], ":ro" if mount.get("readOnly") else ""
        if "emptyDir" in volume:  # the kubelet's emptyDir: empty, writable by the pod's users, size-limited
            size = volume["emptyDir"].get("sizeLimit")
            options = f"rw,exec,mode=1777{',size=' + str(_bytes(size)) if size else ''}"
            return ["--tmpfs", f"{target}:{options}"]
        if "hostPath" in volume:
            return ["--volume", f"{volume['hostPath']['path']}:{target}{ro}"]
        folder = self.scratch / "volumes" / pod.name / volume["name"]
        folder.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            data = self.config_maps[volume["configMap"]["name"]]["data"]
            for key, text in data.items():
                # The pod binds its own address, not every address of the shared network.
                (folder / key).write_text(text.replace("0.0.0.0", pod.ip))
                (folder / key).chmod(0o644)
        elif "secret" in volume:
            secret = volume["secret"]
            for key, text in self.secrets[secret["secretName"]].items():
                (folder / key).write_text(text)
                os.chown(folder / key, 0, int(security.get("fsGroup", 0)))  # the kubelet's fsGroup ownership
                (folder / key).chmod(int(secret.get("defaultMode", 0o644)))
        else:
            raise ValueError(f"volume {volume['name']}: kind {sorted(volume)} is not emulated")
        folder.chmod(0o755)
        return ["--volume", f"{folder}:{target}{ro}"]

    # --- the kubelet's probes ----------------------------------------------------------------------

    def _kubelet(self, pod: Pod) -> None:
        container = pod.container
        startup = Probe.from_spec(container["startupProbe"])
        readiness = Probe.from_spec(container["readinessProbe"])
        liveness = Probe.from_spec(container["livenessProbe"])
        while not pod.gone.is_set() and not self._stopped.is_set():
            run = pod.runs
            started = self._until_started(pod, startup, run)
            if not started:
                continue
            next_ready = next_live = time.monotonic()
            ready_fails = live_fails = 0
            while pod.runs == run and not pod.gone.is_set() and not self._stopped.is_set():
                now = time.monotonic()
                if now >= next_ready:
                    next_ready = now + readiness.period
                    if readiness.check(pod.ip):
                        ready_fails = 0
                        self._set_ready(pod, True)
                    else:
                        ready_fails += 1
                        if ready_fails >= readiness.failures:
                            self._set_ready(pod, False)
                if now >= next_live:
                    next_live = now + liveness.period
                    live_fails = 0 if liveness.check(pod.ip) else live_fails + 1
                    if live_fails >= liveness.failures:
                        log.warning("pod %s: liveness failed %d times: restarting its container", pod.name, live_fails)
                        self._restart(pod)
                        break
                time.sleep(0.1)

    def _until_started(self, pod: Pod, startup: Probe, run: int) -> bool:
        fails = 0
        while pod.runs == run and not pod.gone.is_set() and not self._stopped.is_set():
            if startup.check(pod.ip):
                return True
            fails += 1
            if fails >= startup.failures:
                log.warning("pod %s: startup probe failed %d times: restarting its container", pod.name, fails)
                self._restart(pod)
                return False
            self._sleep_unless_restarted(pod, run, startup.period)
        return False

    def _sleep_unless_restarted(self, pod: Pod, run: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and pod.runs == run and not pod.gone.is_set():
            time.sleep(0.05)

    def _set_ready(self, pod: Pod, ready: bool) -> None:
        if pod.ready != ready and not pod.deleting:
            pod.ready = ready
            self._publish(pod)
            log.info("pod %s %s", pod.name, "ready" if ready else "not ready")

    def _restart(self, pod: Pod) -> None:
        grace = str(pod.spec.get("terminationGracePeriodSeconds", 30))
        docker("restart", "-t", grace, pod.name, check=False)

    def _watch_containers(self) -> None:
        """Container deaths and starts, as the kubelet's pod lifecycle events: a container that died is
        not ready at once (and restarted by its restart policy); a start is probed from the beginning."""
        command = [
            "docker",
            "events",
            "--format",
            "{{json .}}",
            "--filter",
            f"label={LABEL}",
            "--filter",
            "event=die",
            "--filter",
            "event=start",
        ]
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as events:
            self._event_stream = events
            assert events.stdout is not None
            for line in events.stdout:
                if self._stopped.is_set():
                    break
                event = json.loads(line)
                pod = self.pods.get(event.get("Actor", {}).get("Attributes", {}).get("name", ""))
                if pod is None:
                    continue
                if event.get("Action", event.get("status")) == "die":
                    if not pod.deleting:
                        pod.restarts += 1
                        self._set_ready(pod, False)
                        log.info("pod %s: container died (%s)", pod.name, event["Actor"]["Attributes"].get("exitCode"))
                else:
                    pod.runs += 1

    # --- what the test does to pods ----------------------------------------------------------------

    def delete_pod(self, pod: Pod, watch_lag: float = 0.5) -> threading.Thread:
        """As `kubectl delete pod`: SIGTERM and the grace period (docker stop), and a deletionTimestamp that
        discovery sees watch_lag seconds after the kubelet acted on it (the worst order of the two
        watches: the worker drains before the coordinator knows); then the pod is gone. Returns the
        thread that waits for the end."""
        pod.deleting = True
        deleted = threading.Event()

        def finish() -> None:
            grace = int(pod.spec.get("terminationGracePeriodSeconds", 30))
            docker("stop", "-t", str(grace), pod.name, check=False, timeout=grace + 30)
            docker("rm", "-fv", pod.name, check=False)
            pod.gone.set()
            deleted.wait()
            self.api.patch_namespaced_pod(pod.name, self.namespace, {"metadata": {"finalizers": []}})
            log.info("pod %s gone", pod.name)

        thread = threading.Thread(target=finish, name=f"delete-{pod.name}", daemon=True)
        thread.start()
        time.sleep(watch_lag)
        self.api.delete_namespaced_pod(pod.name, self.namespace)  # held by our finalizer until the container ends
        deleted.set()
        return thread

    def rollout_restart(self, deployment: str, ready_timeout: float = 180.0) -> list[Pod]:
        """As `kubectl rollout restart` with maxSurge 0, maxUnavailable 1: one old pod terminates and a new
        one starts; the next old pod goes once the new one is ready. Returns the new pods."""
        strategy = self.deployments[deployment]["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate", strategy
        old = [p for p in self.live_pods(deployment)]
        new: list[Pod] = []
        endings: list[threading.Thread] = []
        for pod in old:
            endings.append(self.delete_pod(pod))
            fresh = self.create_pod(deployment)
            new.append(fresh)
            self.wait_for(lambda fresh=fresh: fresh.ready, f"{fresh.name} ready", ready_timeout)
        for ending in endings:
            ending.join()
        return new

    def kill(self, pod: Pod) -> None:
        """SIGKILL the container's main process, as the kernel's OOM killer would."""
        pid = int(docker("inspect", "-f", "{{.State.Pid}}", pod.name))
        os.kill(pid, signal.SIGKILL)

    def live_pods(self, deployment: str | None = None) -> list[Pod]:
        return [p for p in self.pods.values() if not p.deleting and deployment in (None, p.deployment)]

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float) -> float:
        """Seconds until check() holds; RuntimeError (with the containers' logs' tails) past the timeout."""
        start = time.monotonic()
        while not check():
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting until {what}\n{self.logs_tail()}")
            time.sleep(0.05)
        return time.monotonic() - start

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for pod in self.pods.values():
            if not pod.gone.is_set():
                text = subprocess.run(
                    ["docker", "logs", "--tail", str(lines), pod.name], capture_output=True, text=True
                ).stderr
                out.append(f"--- {pod.name} ---\n{text}")
        return "\n".join(out)

    def stop(self) -> None:
        self._stopped.set()
        if self._event_stream is not None:
            self._event_stream.terminate()
        names = docker("ps", "-aq", "--filter", f"label={LABEL}", check=False)
        if names:
            docker("rm", "-fv", *names.split(), check=False)
        self._api_client.close()
        self._api_loop.run(self._stack.aclose())
        self._api_loop.close()
        shutil.rmtree(self.scratch / "volumes", ignore_errors=True)

    def __iter__(self) -> Iterator[Pod]:
        return iter(list(self.pods.values()))
