"""`make e2e`: the images, run as the chart runs them, driven as a user would (README "End-to-end test").

Renders the chart with deploy/helm/chorus/ci/e2e-values.yaml, runs every rendered pod as a container on
an emulated node (scripts/e2e_node.py: the pod specs, probes, discovery API, deletion, restarts), then:

1. waits until every pod is ready, the coordinator's readiness meaning every model has a ready worker;
2. the SDK over gRPC with the bearer token (and UNAUTHENTICATED without it); the OpenAI API over HTTP
   with the token (and 401 without it); each pod's metrics scraped;
3. a rolling restart of the two-replica model under steady load from several clients that never retry:
   no request may fail, and afterwards the coordinator lists the new pods only;
4. a worker SIGKILLed: its restart policy brings it back and it rejoins (the time is reported).

Prints one JSON summary (also written to --json). The models are the embedded tiny ones in models/.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from e2e_node import Node, Pod  # scripts/, beside this file

import chorus

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("e2e")
CHART = ROOT / "deploy" / "helm" / "chorus"
VALUES = CHART / "ci" / "e2e-values.yaml"
NODE_MODELS = "/opt/chorus/models"  # the values' hostPath for the models: the checkout's models/ here
TOKENS_SECRET = "chorus-e2e-tokens"
# Prompts the embedded models' ensemble answers exactly (tests/test_discovery.py asks the same).
SUMS = {"48+27=": "75", "7+86=": "93"}


def render(image_tag: str, scratch: Path) -> list[dict[str, Any]]:
    """The chart's manifests for the e2e values, with the node's model folder resolved to this checkout."""
    values = yaml.safe_load(VALUES.read_text())
    for model in values["models"]:
        host = model["source"].get("hostPath")
        if host and host["path"].startswith(NODE_MODELS + "/"):
            host["path"] = str(ROOT / "models" / host["path"][len(NODE_MODELS) + 1 :])
    effective = scratch / "values.yaml"
    effective.write_text(yaml.safe_dump(values))
    subprocess.run(["bash", str(ROOT / "scripts" / "fetch_helm.sh")], check=True, capture_output=True)
    helm = str(ROOT / ".tools" / "bin" / "helm")
    command = [
        helm,
        "template",
        "chorus",
        str(CHART),
        "--namespace",
        "ml",
        "-f",
        str(effective),
        "--set",
        f"image.worker.tag={image_tag}",
        "--set",
        f"image.coordinator.tag={image_tag}",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def coordinator_pod(node: Node) -> Pod:
    return next(p for p in node.live_pods() if p.labels.get("app.kubernetes.io/component") == "coordinator")


def addresses(sdk: chorus.Client, model: str) -> set[str]:
    return set(next(m for m in sdk.models().models if m.name == model).addresses)


def check_clients(node: Node, token: str) -> dict[str, Any]:
    """The SDK over gRPC, the OpenAI API over HTTP, each with and without the token; metrics scraped."""
    coordinator = coordinator_pod(node)
    target = coordinator.address("grpc")
    with chorus.Client(target, token=token, timeout=60, retries=0) as sdk:
        for prompt, answer in SUMS.items():
            got = sdk.generate(prompt=prompt, max_new_tokens=4).text
            assert got == answer, f"SDK: {prompt!r} gave {got!r}, want {answer!r}"
        models = [m.name for m in sdk.models().models]
    with chorus.Client(target, timeout=10, retries=0) as anonymous:
        try:
            anonymous.generate(prompt="1+1=", max_new_tokens=2)
            raise AssertionError("a gRPC call without the token was served")
        except chorus.Unauthenticated:
            pass

    http = f"http://{coordinator.address('http')}"
    body = {"model": "chorus", "prompt": "48+27=", "max_tokens": 4, "temperature": 0}
    reply = post(f"{http}/v1/completions", body, token)
    text = reply["choices"][0]["text"]
    assert text == SUMS["48+27="], f"OpenAI completions gave {text!r}"
    # The tiny models know sums, not chat: the answer's shape is checked, not its text.
    chat = {"model": "chorus", "messages": [{"role": "user", "content": "7+86="}], "max_tokens": 4}
    choice = post(f"{http}/v1/chat/completions", chat, token)["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length"), choice
    try:
        post(f"{http}/v1/completions", body, None)
        raise AssertionError("an HTTP call without the token was served")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401, exc.code

    scraped = {}
    for pod in node.live_pods():
        metrics = urllib.request.urlopen(f"http://{pod.address('metrics')}/metrics", timeout=10).read().decode()
        scraped[pod.name] = sum(1 for line in metrics.splitlines() if line.startswith("chorus_"))
        assert scraped[pod.name] > 0, f"{pod.name}: no chorus_ metrics"
    coordinator_metrics = urllib.request.urlopen(f"http://{coordinator.address('metrics')}/metrics", timeout=10)
    requests = [
        line
        for line in coordinator_metrics.read().decode().splitlines()
        if line.startswith("chorus_e2e_request_latency_seconds_count")
    ]
    assert requests, "the coordinator counted no finished request"
    return {"models": models, "metric_lines": scraped, "coordinator_request_counts": requests}


def post(url: str, body: dict[str, Any], token: str | None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


class Load:
    """Clients asking one after another, never retrying; each outcome counted."""

    def __init__(self, target: str, token: str, clients: int) -> None:
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(target, token, i), daemon=True) for i in range(clients)
        ]

    def _client(self, target: str, token: str, i: int) -> None:
        prompts = list(SUMS.items())
        with chorus.Client(target, token=token, timeout=60, retries=0) as sdk:
            n = i
            while not self._stop.is_set():
                prompt, answer = prompts[n % len(prompts)]
                n += 1
                try:
                    text = sdk.generate(prompt=prompt, max_new_tokens=4).text
                except chorus.ChorusError as exc:
                    self.outcomes["failed"] += 1
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                self.outcomes["ok" if text == answer else "wrong"] += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)


def rolling_restart(node: Node, token: str, model: str, clients: int) -> dict[str, Any]:
    deployment = next(p.deployment for p in node.live_pods() if p.labels.get("chorus.dev/model") == model)
    target = coordinator_pod(node).address("grpc")
    with chorus.Client(target, token=token, timeout=30) as sdk:
        before = addresses(sdk, model)
        assert len(before) == 2, f"{model}: the coordinator lists {before}, want two replicas"
        started = time.monotonic()
        with Load(target, token, clients) as load:
            time.sleep(2.0)  # steady load first
            new = node.rollout_restart(deployment)
            want = {p.address("grpc") for p in new}
            node.wait_for(lambda: addresses(sdk, model) == want, f"the coordinator lists {want}", 60)
            time.sleep(2.0)  # and on the new pods
        seconds = time.monotonic() - started
    # Sessions the coordinator moved to the other replica because the first one was already gone.
    logs = subprocess.run(["docker", "logs", coordinator_pod(node).name], capture_output=True, text=True).stderr
    moved = logs.count("could not open the session")
    result = {
        "model": model,
        "clients": clients,
        "seconds": round(seconds, 1),
        "ok": load.outcomes["ok"],
        "failed": load.outcomes["failed"],
        "wrong": load.outcomes["wrong"],
        "sessions_moved": moved,
        "errors": sorted(set(load.errors))[:5],
        "before": sorted(before),
        "after": sorted(want),
    }
    assert load.outcomes["failed"] == 0 and load.outcomes["wrong"] == 0, result
    assert load.outcomes["ok"] > 0, result
    return result


def kill_and_rejoin(node: Node, token: str, model: str) -> dict[str, Any]:
    [pod] = [p for p in node.live_pods() if p.labels.get("chorus.dev/model") == model]
    target = coordinator_pod(node).address("grpc")
    with chorus.Client(target, token=token, timeout=30) as sdk:
        restarts = pod.restarts
        started = time.monotonic()
        node.kill(pod)
        node.wait_for(lambda: pod.restarts > restarts, f"{pod.name}'s container died", 30)
        node.wait_for(lambda: model not in {m.name for m in sdk.models().models if m.addresses}, "it left", 30)
        left = time.monotonic() - started
        node.wait_for(lambda: pod.address("grpc") in addresses(sdk, model), f"{pod.name} rejoined", 180)
        rejoined = time.monotonic() - started
        text = sdk.generate(prompt="48+27=", max_new_tokens=4).text
    assert text == SUMS["48+27="], text
    return {
        "pod": pod.name,
        "restarts": pod.restarts,
        "left_after_s": round(left, 1),
        "rejoined_after_s": round(rejoined, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-tag", default="e2e")
    parser.add_argument("--clients", type=int, default=4, help="clients of the load during the rolling restart")
    parser.add_argument("--json", default="e2e.json", help="where the summary goes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # the API emulator's every request
    token = secrets.token_urlsafe(24)
    summary: dict[str, Any] = {}
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chorus-e2e-") as tmp:
        scratch = Path(tmp)
        scratch.chmod(0o755)
        node = Node(render(args.image_tag, scratch), {TOKENS_SECRET: {"tokens": token + "\n"}}, scratch)
        try:
            node.start()
            coordinator = coordinator_pod(node)
            summary["ready_after_s"] = round(
                node.wait_for(lambda: all(p.ready for p in node.live_pods()), "every pod is ready", 300), 1
            )
            assert coordinator.ready
            summary["clients"] = check_clients(node, token)
            summary["rolling_restart"] = rolling_restart(node, token, "arith-bpe", args.clients)
            summary["kill"] = kill_and_rejoin(node, token, "arith-sp")
            summary["seconds"] = round(time.monotonic() - began, 1)
            summary["ok"] = True
        except Exception as exc:
            summary["ok"] = False
            summary["error"] = f"{type(exc).__name__}: {exc}"
            log.exception("e2e failed; the pods' last log lines:\n%s", node.logs_tail(30))
        finally:
            node.stop()
    text = json.dumps(summary, indent=2)
    print(text)
    Path(args.json).write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
