"""The OpenAI- and GaC-compatible HTTP APIs, called with the official `openai` client and GaC's payload."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest

import chorus
from chorus.v1 import worker_pb2, worker_pb2_grpc
from coordinator.cluster import WorkerProcess, start_coordinator
from tests.cluster_helpers import MODELS, LoopThread, make_config, worker
from tests.tiny_models import never_ending_llama


@pytest.fixture(scope="module")
def servers(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> Iterator[tuple[str, str]]:
    """(gRPC target, HTTP base URL) of a coordinator over the default models."""
    workers = [default_workers["arith-bpe"], default_workers["arith-sp"]]
    config = make_config(workers, http={"enabled": True, "port": 0})
    running = loop.run(start_coordinator(config, [w.address for w in workers], port=0))
    assert running.http is not None
    yield f"127.0.0.1:{running.port}", f"http://127.0.0.1:{running.http.port}"
    loop.run(running.stop(grace=0))


@pytest.fixture()
def client(servers: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{servers[1]}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_equals_the_grpc_answer(servers: tuple[str, str], client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "48+27="}]
    reply = client.chat.completions.create(model="chorus", messages=messages, max_tokens=6)  # type: ignore[arg-type]
    with chorus.Client(servers[0], timeout=60) as sdk:
        expected = sdk.generate(messages=messages, apply_chat_template=True, max_new_tokens=6)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage is not None and reply.usage.completion_tokens == expected.usage.completion_tokens


def test_streaming_chat_deltas_add_up(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "7+86="}]
    whole = client.chat.completions.create(model="chorus", messages=messages, max_tokens=6)  # type: ignore[arg-type]
    stream = client.chat.completions.create(model="chorus", messages=messages, max_tokens=6, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_with_a_list_of_prompts_and_ensemble_options(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="chorus", prompt=["48+27=", "7+86="], max_tokens=4, extra_body={"strategy": "gac", "top_k": 0}
    )
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == ["75", "93"]
    weighted = client.completions.create(
        model="chorus", prompt="12+35=", max_tokens=4, extra_body={"weights": {"arith-sp": 1, "arith-bpe": 1e-6}}
    )
    assert weighted.choices[0].text == "47"  # arith-sp's answer (arith-bpe alone says 48)
    stream = client.completions.create(model="chorus", prompt="48+27=", max_tokens=4, stream=True)
    assert "".join(c.choices[0].text for c in stream) == "75"


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["chorus", "arith-bpe", "arith-sp"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"temperature": -1}, "temperature"), ({"n": 2}, "n"), ({"extra_body": {"strategy": "nope"}}, "strategy")],
)
def test_bad_requests_are_400_naming_the_field(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chorus", messages=[{"role": "user", "content": "1"}], **extra)
    assert param in str(caught.value)
    ok = client.completions.create(model="chorus", prompt="48+27=", max_tokens=4)  # still serving
    assert ok.choices[0].text == "75"


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_gac_api_answers_gacs_own_request(servers: tuple[str, str]) -> None:
    # The request from GaC's README, as its users send it (apply_chat_template, a batch of two).
    data = {
        "messages_list": [
            [{"role": "user", "content": "9.11 and 9.9, which is bigger?"},
             {"role": "assistant", "content": "..."},
             {"role": "user", "content": "..."}],
            [{"role": "user", "content": "How are you?"}],
        ],
        "max_new_tokens": 8,
        "apply_chat_template": True,
    }  # fmt: skip
    status, reply = _post(f"{servers[1]}/api/generate/", json.dumps(data).encode())
    # The embedded models have a 64-token context, which the first conversation exceeds: a clear 400.
    assert status == 400 and "context" in reply["error"]["message"], reply
    data["messages_list"][0] = [{"role": "user", "content": "9.11 and 9.9?"}]
    status, reply = _post(f"{servers[1]}/api/generate/", json.dumps(data).encode())
    assert status == 200, reply
    assert isinstance(reply["response"], list) and len(reply["response"]) == 2
    assert all(isinstance(t, str) for t in reply["response"])
    conversations = [[{"role": "user", "content": "48+27="}], [{"role": "user", "content": "héllo"}]]
    gac = {"messages_list": conversations, "max_new_tokens": 6, "apply_chat_template": True, "until": ["\n"]}
    status, reply = _post(f"{servers[1]}/api/generate/", json.dumps(gac).encode())
    with chorus.Client(servers[0], timeout=60) as sdk:
        expected = sdk.generate_batch(conversations, max_new_tokens=6, apply_chat_template=True, stop=["\n"])
    assert (status, reply) == (200, {"response": [r.text for r in expected]})
    with urllib.request.urlopen(f"{servers[1]}/status", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    status, reply = _post(f"{servers[1]}/api/generate/", b"{not json")
    assert status == 400 and "JSON" in reply["error"]["message"]


@pytest.fixture(scope="module")
def endless(loop: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, str]]:
    """A never-ending model's worker and the HTTP URL of a coordinator over it."""
    w = worker(never_ending_llama(tmp_path_factory.mktemp("endless"), MODELS / "arith-sp"), "endless")
    running = loop.run(start_coordinator(make_config([w], http={"enabled": True, "port": 0}), [w.address], port=0))
    assert running.http is not None
    yield w, f"http://127.0.0.1:{running.http.port}"
    loop.run(running.stop(grace=0))
    w.stop()


def test_disconnecting_mid_stream_frees_the_sessions(endless: tuple[WorkerProcess, str]) -> None:
    endless_worker, url = endless
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps({"prompt": "hello", "max_tokens": 4000, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    response = urllib.request.urlopen(request, timeout=60)
    response.readline()  # the first event has arrived: the generation runs
    assert _sessions(endless_worker.address) == 1
    response.close()
    deadline = time.monotonic() + 10
    while _sessions(endless_worker.address):
        assert time.monotonic() < deadline, "the session was not freed"
        time.sleep(0.05)


def _sessions(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.ModelWorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5).active_sessions
