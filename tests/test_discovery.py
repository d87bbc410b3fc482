"""Kubernetes discovery against a Kubernetes API test server (kmock) over real HTTP with the real client.

Worker pods are objects in the emulated API whose pod IP and `grpc` port point at real worker
processes on localhost; they appear, turn ready, and disappear while the coordinator serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kmock import KubernetesEmulator, Server
from kubernetes import client

import chorus
from chorus_local.cluster import WorkerProcess, start_coordinator
from coordinator.config import EnsembleConfig, parse_config
from coordinator.ensemble import Member, NotReady, Replica
from tests.cluster_helpers import MODELS, ROOT, LoopThread, worker

NAMESPACE = "chorus"


@pytest.fixture(scope="module")
def bpe_replica() -> Iterator[WorkerProcess]:
    w = worker(MODELS / "arith-bpe", "arith-bpe")
    yield w
    w.stop()


@pytest.fixture()
def kube(loop: LoopThread) -> Iterator[client.CoreV1Api]:
    async def start() -> tuple[AsyncExitStack, str]:
        stack = AsyncExitStack()
        emulator = await stack.enter_async_context(KubernetesEmulator())
        server = await stack.enter_async_context(Server(emulator))
        return stack, str(server.url).rstrip("/")

    stack, url = loop.run(start())
    configuration = client.Configuration()
    configuration.host = url
    api = client.ApiClient(configuration)
    yield client.CoreV1Api(api)
    api.close()
    loop.run(stack.aclose())


def _discovery_config(models: list[dict[str, str]], **sections: Any) -> EnsembleConfig:
    """A coordinator config that finds the models' workers as pods labelled app=chorus-worker."""
    discovery = {"mode": "kubernetes", "namespace": NAMESPACE, "label_selector": "app=chorus-worker"}
    return parse_config({"models": models, "server": {"port": 0}, "discovery": discovery, **sections}, ROOT)


def _pod(name: str, model: str, address: str, ready: bool) -> dict[str, Any]:
    ip, port = address.rsplit(":", 1)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"app": "chorus-worker", "chorus.dev/model": model},
        },
        "spec": {
            "containers": [{"name": "worker", "image": "w", "ports": [{"name": "grpc", "containerPort": int(port)}]}]
        },
        "status": {"podIP": ip, "containerStatuses": [_container(ready)]},
    }


def _container(ready: bool) -> dict[str, Any]:
    return {"name": "worker", "ready": ready, "restartCount": 0, "image": "w", "imageID": "w"}


def _eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.05)


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_pods_join_when_ready_and_leave_when_gone(
    loop: LoopThread, kube: client.CoreV1Api, default_workers: dict[str, WorkerProcess], bpe_replica: WorkerProcess
) -> None:
    bpe, sp = default_workers["arith-bpe"], default_workers["arith-sp"]
    config = _discovery_config(
        [{"name": "arith-bpe", "path": "models/arith-bpe"}, {"name": "arith-sp", "path": "models/arith-sp"}]
    )
    kube.create_namespaced_pod(NAMESPACE, _pod("bpe-0", "arith-bpe", bpe.address, ready=False))
    kube.create_namespaced_pod(NAMESPACE, _pod("sp-0", "arith-sp", sp.address, ready=True))
    running = loop.run(start_coordinator(config, port=0, api_client=kube.api_client))
    target = f"127.0.0.1:{running.port}"
    try:
        with chorus.Client(target, timeout=30) as sdk:
            # arith-bpe's only pod is not ready: not serving, and requests are retryable UNAVAILABLE.
            _eventually(lambda: sdk.models().models[1].addresses == (sp.address,), "arith-sp joined")
            assert not _serving(target)
            with pytest.raises(chorus.Unavailable, match="arith-bpe"):
                sdk.generate(prompt="48+27=")

            kube.patch_namespaced_pod("bpe-0", NAMESPACE, {"status": {"containerStatuses": [_container(True)]}})
            _eventually(lambda: _serving(target), "the coordinator serves")
            assert sdk.generate(prompt="48+27=", max_new_tokens=4).text == "75"

            # A second replica of arith-bpe joins (placement over replicas: the test below).
            kube.create_namespaced_pod(NAMESPACE, _pod("bpe-1", "arith-bpe", bpe_replica.address, ready=True))
            both = tuple(sorted([bpe.address, bpe_replica.address]))
            _eventually(lambda: sdk.models().models[0].addresses == both, "the second replica joined")

            # During generation the first replica disappears: the request finishes where it runs.
            stream = sdk.stream(prompt="48+27=", max_new_tokens=4)
            first = next(stream)
            kube.delete_namespaced_pod("bpe-0", NAMESPACE)
            assert first + "".join(stream) == "75"
            _eventually(lambda: sdk.models().models[0].addresses == (bpe_replica.address,), "bpe-0 left")
            assert sdk.generate(prompt="7+86=", max_new_tokens=4).text == "93"

            # A terminating pod leaves at once: deleted, it stays in the API with a deletionTimestamp
            # (here a finalizer holds it, as kubelet does for the grace period) and still reads ready.
            held = _pod("bpe-2", "arith-bpe", bpe.address, ready=True)
            held["metadata"]["finalizers"] = ["chorus.dev/test-hold"]
            kube.create_namespaced_pod(NAMESPACE, held)
            _eventually(lambda: sdk.models().models[0].addresses == both, "bpe-2 joined")
            kube.delete_namespaced_pod("bpe-2", NAMESPACE)
            terminating = kube.read_namespaced_pod("bpe-2", NAMESPACE)
            assert terminating.metadata.deletion_timestamp is not None
            assert all(c.ready for c in terminating.status.container_statuses)
            _eventually(lambda: sdk.models().models[0].addresses == (bpe_replica.address,), "terminating bpe-2 left")
            assert sdk.generate(prompt="48+27=", max_new_tokens=4).text == "75"

            # A replica that stops being ready leaves too; with none left, requests are UNAVAILABLE.
            kube.patch_namespaced_pod("bpe-1", NAMESPACE, {"status": {"containerStatuses": [_container(False)]}})
            _eventually(lambda: not _serving(target), "the coordinator stops serving")
            with pytest.raises(chorus.Unavailable):
                sdk.generate(prompt="48+27=")
    finally:
        loop.run(running.stop(grace=0))


def test_requests_go_to_the_least_loaded_replica_and_stay() -> None:
    member = Member(spec=parse_config({"models": [{"name": "m", "path": "x"}]}, ROOT).models[0], weight=1.0)
    with pytest.raises(NotReady):
        member.acquire()
    member.replicas = {"a": Replica(client=None), "b": Replica(client=None)}  # type: ignore[arg-type]
    placed = [member.acquire() for _ in range(4)]
    assert [r.active for r in member.replicas.values()] == [2, 2]
    assert placed[0] is member.replicas["a"] and placed[1] is member.replicas["b"]
    member.replicas["a"].retired = True  # left discovery: gets no new requests
    assert member.acquire() is member.replicas["b"]


def test_a_replica_gone_before_the_session_opened_hands_it_to_another(
    loop: LoopThread, kube: client.CoreV1Api, default_workers: dict[str, WorkerProcess]
) -> None:
    """A replica that died (or is shutting down in a rolling restart) while discovery still lists it: the
    requests placed on it open their session on the model's other replica instead, and none fails."""
    bpe, sp = default_workers["arith-bpe"], default_workers["arith-sp"]
    doomed = worker(MODELS / "arith-bpe", "arith-bpe")
    config = _discovery_config([{"name": "arith-bpe"}, {"name": "arith-sp"}])
    # The doomed replica joins first: placement ties go to it (the test would pass without a retry otherwise).
    kube.create_namespaced_pod(NAMESPACE, _pod("bpe-doomed", "arith-bpe", doomed.address, ready=True))
    kube.create_namespaced_pod(NAMESPACE, _pod("sp-0", "arith-sp", sp.address, ready=True))
    running = loop.run(start_coordinator(config, port=0, api_client=kube.api_client))
    target = f"127.0.0.1:{running.port}"
    try:
        with chorus.Client(target, timeout=30) as sdk:
            _eventually(lambda: _serving(target), "the coordinator serves")
            kube.create_namespaced_pod(NAMESPACE, _pod("bpe-0", "arith-bpe", bpe.address, ready=True))
            both = tuple(sorted([bpe.address, doomed.address]))
            _eventually(lambda: sdk.models().models[0].addresses == both, "the second replica joined")
            doomed.process.kill()
            doomed.process.wait()
            assert sdk.models().models[0].addresses == both  # discovery has not seen it go
            answers = [sdk.generate(prompt="48+27=", max_new_tokens=4).text for _ in range(3)]
            assert answers == ["75"] * 3
    finally:
        loop.run(running.stop(grace=0))
        doomed.stop()


def test_a_request_whose_replica_refused_it_waits_for_a_successor_to_join(
    loop: LoopThread, kube: client.CoreV1Api, default_workers: dict[str, WorkerProcess]
) -> None:
    """A rolling restart's window: the replica a request was placed on refuses it (draining, or gone) and
    the coordinator knows no other yet (the successor is ready, its Info not yet fetched). The request
    waits up to `replica_wait_s` for a replica to join and opens its session there; past that it fails
    with UNAVAILABLE. `make e2e`'s rolling restart lost two of 1,404 requests this way under load."""
    bpe, sp = default_workers["arith-bpe"], default_workers["arith-sp"]
    doomed = worker(MODELS / "arith-bpe", "arith-bpe")
    config = _discovery_config([{"name": "arith-bpe"}, {"name": "arith-sp"}], limits={"replica_wait_s": 2.0})
    kube.create_namespaced_pod(NAMESPACE, _pod("bpe-doomed", "arith-bpe", doomed.address, ready=True))
    kube.create_namespaced_pod(NAMESPACE, _pod("sp-0", "arith-sp", sp.address, ready=True))
    running = loop.run(start_coordinator(config, port=0, api_client=kube.api_client))
    target = f"127.0.0.1:{running.port}"
    try:
        with chorus.Client(target, timeout=30, retries=0) as sdk, ThreadPoolExecutor(1) as pool:
            _eventually(lambda: _serving(target), "the coordinator serves")
            doomed.process.kill()
            doomed.process.wait()
            started = time.monotonic()
            with pytest.raises(chorus.Unavailable, match="'arith-bpe' was lost"):
                sdk.generate(prompt="48+27=", max_new_tokens=4)  # no successor comes
            assert time.monotonic() - started >= 2.0, "it failed without waiting for a successor"
            waiting = pool.submit(sdk.generate, prompt="48+27=", max_new_tokens=4)
            time.sleep(1.0)
            assert not waiting.done(), waiting.exception()
            kube.create_namespaced_pod(NAMESPACE, _pod("bpe-0", "arith-bpe", bpe.address, ready=True))
            assert waiting.result(30).text == "75"
    finally:
        loop.run(running.stop(grace=0))
        doomed.stop()
