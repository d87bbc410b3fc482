"""Kubernetes discovery: worker pods found by label through the Kubernetes API (list, then watch).

A pod serves when all its containers are ready and it is not terminating; it leaves when it stops
being so or is deleted. The official client is synchronous, so the watch runs in a thread and
hands changes to the ensemble on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from coordinator.config import Discovery
from coordinator.ensemble import Ensemble

log = logging.getLogger(__name__)

_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_WATCH_SECONDS = 60  # the API server ends watches; we list again and watch from there


def pod_endpoint(pod: Any, settings: Discovery) -> tuple[str, str] | None:
    """(model, address) of a pod that serves now, else None."""
    meta, status = pod.metadata, pod.status
    model = (meta.labels or {}).get(settings.model_label)
    if not model or meta.deletion_timestamp is not None or status is None or not status.pod_ip:
        return None
    containers = status.container_statuses or []
    if not containers or not all(c.ready for c in containers):
        return None
    port = settings.port
    for container in pod.spec.containers or []:
        for p in container.ports or []:
            if p.name == settings.port_name:
                port = p.container_port
    return model, f"{status.pod_ip}:{port}"


def default_api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class KubernetesDiscovery:
    def __init__(self, ensemble: Ensemble, settings: Discovery, api_client: client.ApiClient | None = None) -> None:
        self._ensemble = ensemble
        self._settings = settings
        self._api = api_client or default_api_client()
        self._namespace = settings.namespace or (
            _NAMESPACE_FILE.read_text().strip() if _NAMESPACE_FILE.exists() else "default"
        )
        self._known: dict[str, tuple[str, str]] = {}  # pod name -> (model, address)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name="k8s-discovery", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._watch is not None:
            self._watch.stop()

    def _run(self) -> None:
        pods = client.CoreV1Api(self._api)
        selector = self._settings.label_selector
        while not self._stopped.is_set():
            try:
                listing = pods.list_namespaced_pod(self._namespace, label_selector=selector)
                self._reconcile({p.metadata.name: p for p in listing.items})
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    pods.list_namespaced_pod,
                    self._namespace,
                    label_selector=selector,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=_WATCH_SECONDS,
                ):
                    pod = event["object"]
                    self._update(pod.metadata.name, None if event["type"] == "DELETED" else pod)
                    if self._stopped.is_set():
                        break
            except Exception as exc:
                log.warning("kubernetes discovery: %s; retrying", exc)
                self._stopped.wait(1.0)

    def _reconcile(self, pods: dict[str, Any]) -> None:
        for name in set(self._known) - set(pods):
            self._update(name, None)
        for name, pod in pods.items():
            self._update(name, pod)

    def _update(self, name: str, pod: Any | None) -> None:
        now = pod_endpoint(pod, self._settings) if pod is not None else None
        before = self._known.get(name)
        if now == before:
            return
        if before is not None:
            del self._known[name]
            self._submit(self._ensemble.remove_worker(*before))
        if now is not None:
            self._known[name] = now
            self._submit(self._ensemble.add_worker(*now))

    def _submit(self, coro: Any) -> None:
        assert self._loop is not None
        # Waiting keeps the ensemble's view in the order the API reported changes.
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()
