"""The OpenAI- and GaC-compatible HTTP APIs, called with the official `openai` client and GaC's payload."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chorus
from chorus.v1 import common_pb2, coordinator_pb2, worker_pb2, worker_pb2_grpc
from chorus_local.cluster import WorkerProcess, start_coordinator
from coordinator.config import parse_config
from coordinator.convert import InvalidRequest, requests_from_proto
from coordinator.failures import BadRequest, ModelNotFound, answer
from coordinator.http_models import ChatCompletionRequest, CompletionRequest, GacRequest
from coordinator.strategies import STRATEGIES
from tests.cluster_helpers import MODELS, ROOT, LoopThread, make_config, worker
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
    # Greedy asked explicitly: OpenAI's default temperature is 1 (the config sets none).
    reply = client.chat.completions.create(model="chorus", messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    with chorus.Client(servers[0], timeout=60) as sdk:
        expected = sdk.generate(messages=messages, apply_chat_template=True, max_new_tokens=6)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage is not None and reply.usage.completion_tokens == expected.usage.completion_tokens


def test_streaming_chat_deltas_add_up(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "7+86="}]
    whole = client.chat.completions.create(model="chorus", messages=messages, max_tokens=6, seed=3)  # type: ignore[arg-type]
    stream = client.chat.completions.create(model="chorus", messages=messages, max_tokens=6, seed=3, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_with_a_list_of_prompts_and_ensemble_options(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="chorus",
        prompt=["48+27=", "7+86="],
        max_tokens=4,
        temperature=0,
        extra_body={"strategy": "gac", "top_k": 0},
    )
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == ["75", "93"]
    weighted = client.completions.create(
        model="chorus",
        prompt="12+35=",
        max_tokens=4,
        temperature=0,
        extra_body={"weights": {"arith-sp": 1, "arith-bpe": 1e-6}},
    )
    assert weighted.choices[0].text == "47"  # arith-sp's answer (arith-bpe alone says 48)
    stream = client.completions.create(model="chorus", prompt="48+27=", max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == "75"


def test_models_list(client: openai.OpenAI) -> None:
    models = list(client.models.list())
    assert [m.id for m in models] == ["chorus", "arith-bpe", "arith-sp"]
    assert [(m.model_extra or {})["chorus"]["kind"] for m in models] == ["ensemble", "member", "member"]
    assert (models[0].model_extra or {})["chorus"]["members"] == ["arith-bpe", "arith-sp"]
    assert client.models.retrieve("arith-sp").id == "arith-sp"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"temperature": -1}, "temperature"), ({"n": 0}, "n"), ({"extra_body": {"strategy": "nope"}}, "strategy")],
)
def test_bad_requests_are_400_naming_the_field(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chorus", messages=[{"role": "user", "content": "1"}], **extra)
    assert param in str(caught.value)
    ok = client.completions.create(model="chorus", prompt="48+27=", max_tokens=4, temperature=0)  # still serving
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
            [
                {"role": "user", "content": "9.11 and 9.9, which is bigger?"},
                {"role": "assistant", "content": "..."},
                {"role": "user", "content": "..."},
            ],
            [{"role": "user", "content": "How are you?"}],
        ],
        "max_new_tokens": 8,
        "apply_chat_template": True,
    }
    status, reply = _post(f"{servers[1]}/api/generate/", json.dumps(data).encode())
    # The embedded models have a 64-token context, which the first conversation exceeds: a clear 400.
    # (Over a longer context the request is answered: test_gac_api_answers_the_gac_readme_request_unchanged.)
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


# GaC's README request, byte for byte as its example sends it (`requests.post(url, json=data)`).
GAC_SEED_REQUEST = {
    "messages_list": [
        [
            {"role": "user", "content": "9.11 and 9.9, which is bigger?"},
            {"role": "assistant", "content": "..."},
            {"role": "user", "content": "..."},
        ],
        [{"role": "user", "content": "How are you?"}],
    ],
    "max_new_tokens": 1024,
    "apply_chat_template": True,
}


def test_gac_api_answers_the_gac_readme_request_unchanged(loop: LoopThread, tmp_path: Path) -> None:
    # GaC's 1024 new tokens fit a 2048-token context, and are all generated.
    w = worker(never_ending_llama(tmp_path / "long", context=2048), "long-context")
    try:
        config = make_config([w], http={"enabled": True, "port": 0})
        running = loop.run(start_coordinator(config, [w.address], port=0))
        try:
            assert running.http is not None
            url = f"http://127.0.0.1:{running.http.port}/api/generate/"
            status, reply = _post(url, json.dumps(GAC_SEED_REQUEST).encode())
            with chorus.Client(f"127.0.0.1:{running.port}", timeout=120) as sdk:  # the 1024 are not capped
                (done,) = sdk.generate_batch(GAC_SEED_REQUEST["messages_list"][1:], max_new_tokens=1024)
        finally:
            loop.run(running.stop(grace=0))
    finally:
        w.stop()
    assert status == 200, reply
    assert isinstance(reply["response"], list) and len(reply["response"]) == 2
    assert all(isinstance(t, str) and t for t in reply["response"])
    assert (done.finish_reason, done.usage.completion_tokens) == ("length", 1024)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_length", "x"),
        ("max_length", [1]),
        ("max_length", 2.5),
        ("max_length", True),
        ("max_new_tokens", "x"),
        ("max_new_tokens", [1]),
        ("max_new_tokens", {"n": 1}),
        ("max_new_tokens", 1e400),
        ("max_new_tokens", -1),
        ("max_new_tokens", 10**30),
    ],
)
def test_gac_bad_lengths_are_400_naming_the_field(servers: tuple[str, str], field: str, value: Any) -> None:
    body = {"messages_list": [[{"role": "user", "content": "48+27="}]], "max_new_tokens": 4, field: value}
    status, reply = _post(f"{servers[1]}/api/generate/", json.dumps(body).encode())
    assert status == 400, reply
    assert field in reply["error"]["message"] and reply["error"]["param"] == field, reply
    del body[field]
    status, reply = _post(f"{servers[1]}/api/generate/", json.dumps(body).encode())
    assert status == 200 and len(reply["response"]) == 1, reply  # still serving


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/api/generate/"])
@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (b'{"prompt": "\xff\xfe"}', "application/json", "UTF-8"),
        (b'{"messages": [{"role": "user", "content": "\xc3"}]}', "application/json", "UTF-8"),
        (
            b'{"prompt": "\\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}',
            "application/json",
            "surrogate",
        ),
        (b'{"prompt": "1"}', "application/json; charset=no-such-charset", "charset"),
        (b"[" * 100_000, "application/json", "body"),
    ],
    ids=["invalid-utf8", "truncated-utf8", "lone-surrogate", "unknown-charset", "deep-nesting"],
)
def test_undecodable_bodies_are_400(
    servers: tuple[str, str], path: str, body: bytes, content_type: str, says: str
) -> None:
    request = urllib.request.Request(f"{servers[1]}{path}", data=body, headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    reply = json.loads(caught.value.read())
    assert caught.value.code == 400 and says in reply["error"]["message"], reply


# --- the bodies' models, without a server: one set of rules with the gRPC API ------------------------

BODY_CONFIG = parse_config({"models": [{"name": "arith-bpe", "path": "x"}, {"name": "arith-sp", "path": "y"}]}, ROOT)
USER = {"role": "user", "content": "1+1="}


def _conversation(*messages: tuple[str, str]) -> common_pb2.Conversation:
    return common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages])


def test_http_bodies_build_the_requests_their_grpc_twins_do() -> None:
    """An HTTP body and the GenerateRequest asking the same make the same domain requests: the same rules,
    and the sampling numbers at the gRPC API's precision (float32), so that both draw the same samples."""
    config = parse_config(
        {"models": [{"name": "arith-bpe", "path": "x", "priority": "primary"}, {"name": "arith-sp", "path": "y"}]}, ROOT
    )
    sampling = {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "seed": 7,
        "stop": ["\n"],
        "threshold": 0.3,
        "strategy": "threshold",
        "on_worker_loss": "degrade",
    }
    weights = {"arith-sp": 0.3}
    body = {"model": "chorus", "prompt": "1+1=", "max_tokens": 3, "weights": weights, **sampling}
    twin = coordinator_pb2.GenerateRequest(
        prompt="1+1=", max_new_tokens=3, weights=weights, request_id="r1", **sampling
    )
    assert CompletionRequest.parse(body, config).requests(config, "r1") == requests_from_proto(twin, config)

    chat = {
        "messages": [{"role": "developer", "content": "Add."}, USER],
        "max_tokens": 9,
        "max_completion_tokens": 3,
        "temperature": 0.7,
        "apply_chat_template": False,
    }
    twin = coordinator_pb2.GenerateRequest(
        messages=_conversation(("system", "Add."), ("user", "1+1=")),
        max_new_tokens=3,
        temperature=0.7,
        apply_chat_template=False,
    )
    assert ChatCompletionRequest.parse(chat, config).requests(config, "") == requests_from_proto(twin, config)

    gac = {
        "messages_list": [[USER], [USER, {"role": "assistant", "content": "2"}, USER]],
        "max_new_tokens": 8,
        "max_length": 5,
        "until": "\n",
        "apply_chat_template": True,
        "ignored": 1,
    }
    batch = [_conversation(("user", "1+1=")), _conversation(("user", "1+1="), ("assistant", "2"), ("user", "1+1="))]
    twin = coordinator_pb2.GenerateRequest(
        batch=coordinator_pb2.ConversationBatch(conversations=batch),
        max_new_tokens=5,
        stop=["\n"],
        apply_chat_template=True,
    )
    assert GacRequest.parse(gac, config).requests(config, "") == requests_from_proto(twin, config)


BASE_BODIES: dict[type, dict[str, Any]] = {
    ChatCompletionRequest: {"messages": [USER]},
    CompletionRequest: {"prompt": "1+1="},
    GacRequest: {"messages_list": [[USER]]},
}
BODY_REFUSALS: list[tuple[type, dict[str, Any], int, str]] = [
    (ChatCompletionRequest, {"temperature": True}, 400, "temperature"),  # JSON's true is no number
    (ChatCompletionRequest, {"weights": {"arith-sp": True}}, 400, "weights"),
    (ChatCompletionRequest, {"apply_chat_template": 1}, 400, "apply_chat_template"),
    (ChatCompletionRequest, {"max_tokens": 2.5}, 400, "max_tokens"),
    (ChatCompletionRequest, {"max_completion_tokens": "3"}, 400, "max_completion_tokens"),
    (ChatCompletionRequest, {"max_tokens": 0}, 400, "max_new_tokens"),
    (ChatCompletionRequest, {"top_k": 2**32}, 400, "top_k"),
    (ChatCompletionRequest, {"seed": -1}, 400, "seed"),
    (ChatCompletionRequest, {"stop": [1]}, 400, "stop"),
    (ChatCompletionRequest, {"stop": ["\n", "x" * 257]}, 400, "stop[1]"),
    (CompletionRequest, {"threshold": 5}, 400, "threshold"),
    # Options that would otherwise be accepted and do nothing: a template for a text prompt, a threshold
    # for a strategy that reads none.
    (CompletionRequest, {"apply_chat_template": True}, 400, "apply_chat_template"),
    (ChatCompletionRequest, {"threshold": 0.5, "strategy": "unite"}, 400, "threshold"),
    (
        ChatCompletionRequest,
        {"stream": True, "stream_options": {"include_usage": 1}},
        400,
        "stream_options.include_usage",
    ),
    (ChatCompletionRequest, {"stream": True, "stream_options": {"chunk_size": 1}}, 400, "stream_options.chunk_size"),
    (ChatCompletionRequest, {"messages": None}, 400, "messages"),
    (ChatCompletionRequest, {"messages": [{"role": 5, "content": "1"}]}, 400, "messages[0]"),
    (ChatCompletionRequest, {"messages": [USER, {"role": "user", "content": [{"text": 5}]}]}, 400, "messages[1]"),
    (ChatCompletionRequest, {"model": "gpt-4", "n": 0, "tools": None}, 404, "model"),  # before the other problems
    (ChatCompletionRequest, {"metadata": {"team": 1}}, 400, "metadata"),
    (CompletionRequest, {"prompt": None}, 400, "prompt"),
    (CompletionRequest, {"prompt": ["1", ""]}, 400, "prompt"),
    (CompletionRequest, {"strategy": 5}, 400, "strategy"),
    (CompletionRequest, {"on_worker_loss": "retry"}, 400, "on_worker_loss"),
    (CompletionRequest, {"metadata": {}}, 400, "metadata"),  # a chat field
    (GacRequest, {"messages_list": None}, 400, "messages_list"),
    (GacRequest, {"messages_list": [[]]}, 400, "messages_list[0]"),
    (GacRequest, {"messages_list": [[USER], "hi"]}, 400, "messages_list[1]"),
    (GacRequest, {"messages_list": [[USER, {"role": "tool", "content": "1"}]]}, 400, "messages_list[0][1].role"),
    (GacRequest, {"messages_list": [[USER]] * 65}, 400, "messages_list"),
    (GacRequest, {"until": 5}, 400, "until"),
    (GacRequest, {"apply_chat_template": "yes"}, 400, "apply_chat_template"),
]


@pytest.mark.parametrize("request_id", ["r" * 129, "a\r\nb"])
def test_x_request_id_is_bounded_as_grpc_request_id(request_id: str) -> None:
    body = CompletionRequest.parse(BASE_BODIES[CompletionRequest], BODY_CONFIG)
    with pytest.raises(InvalidRequest) as caught:
        body.requests(BODY_CONFIG, request_id)  # the X-Request-Id header's value
    failed = answer(caught.value)
    assert (failed.status.http, failed.param) == (400, "request_id"), failed


@pytest.mark.parametrize(("model", "fields", "status", "param"), BODY_REFUSALS)
def test_bodies_are_refused_naming_the_field_before_generating(
    model: type[ChatCompletionRequest | CompletionRequest | GacRequest], fields: dict[str, Any], status: int, param: str
) -> None:
    base = BASE_BODIES[model]
    with pytest.raises((BadRequest, InvalidRequest, ModelNotFound)) as caught:
        model.parse({**base, **fields}, BODY_CONFIG).requests(BODY_CONFIG, "r")
    failed = answer(caught.value)
    assert (failed.status.http, failed.param) == (status, param), failed
    assert status == 404 or failed.message.startswith(f"{param}: "), failed
    assert model.parse(base, BODY_CONFIG).requests(BODY_CONFIG, "r")  # the body without them is fine


# --- fuzzing: whatever JSON a client sends, the answer is 2xx or 4xx, never 5xx -----------------

INPUT_FIELD = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/api/generate/": "messages_list"}
MODEL_NAMES = ("arith-bpe", "arith-sp")
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["\ud800", "", "user", "gac", "1+1="]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
small_ints = st.integers(-2, 6) | st.sampled_from([0.5, 2.0, 2**32, 2**64, 10**30])
valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer"]), "content": st.text(max_size=10)}
)
odd_message = (
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "wizard", "tool"]) | json_values,
            "content": st.text(max_size=10)
            | st.lists(st.fixed_dictionaries({"text": json_values}), max_size=2)
            | json_values,
        },
    )
    | json_values
)
messages = st.lists(valid_message, min_size=1, max_size=3) | st.lists(valid_message | odd_message, max_size=3)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["chorus", "gpt-4"]),
    "messages": messages,
    "messages_list": st.lists(messages, min_size=1, max_size=3) | st.lists(messages, max_size=3),
    "prompt": st.text(max_size=10) | st.lists(st.text(max_size=10), max_size=3),
    "max_tokens": small_ints,
    "max_completion_tokens": small_ints,
    "max_new_tokens": small_ints,
    "max_length": small_ints | st.sampled_from(["3", "x", "1e3"]),
    "n": small_ints,
    "temperature": st.floats(0, 2) | st.floats(),
    "top_p": st.floats(0, 1) | st.floats(),
    "top_k": small_ints,
    "seed": small_ints,
    "threshold": st.floats(0, 1) | st.floats(),
    "apply_chat_template": st.booleans(),
    "strategy": st.sampled_from([*STRATEGIES, "nope"]),
    "on_worker_loss": st.sampled_from(["fail", "degrade", "retry"]),
    "weights": st.dictionaries(st.sampled_from([*MODEL_NAMES, "x"]), st.floats() | st.integers(-1, 10**400)),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "until": st.lists(st.text(max_size=3), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.booleans() | small_ints,
    "top_logprobs": small_ints,
    "user": st.text(max_size=5),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    "frequency_penalty": st.sampled_from([0, 0.5]),
    "tools": json_values,
}


@st.composite
def posts(draw: st.DrawFn) -> tuple[str, Any]:
    """(path, body): mostly the endpoint's input field and other real fields, each with a plausible
    value or else any JSON value; now and then any JSON at all."""
    path = draw(st.sampled_from(sorted(INPUT_FIELD)))
    if draw(st.integers(0, 19)) == 0:
        return path, draw(json_values)
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=5, unique=True))
    if draw(st.integers(0, 9)):
        names.append(INPUT_FIELD[path])
    return path, {name: draw(FIELDS[name] if draw(st.integers(0, 3)) else json_values) for name in names}


def _post_raw(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def fuzz_url(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> Iterator[str]:
    """An HTTP API whose accepted requests generate a few tokens at most."""
    workers = [default_workers[name] for name in MODEL_NAMES]
    config = make_config(
        workers, http={"enabled": True, "port": 0}, limits={"max_new_tokens": 4}, defaults={"max_new_tokens": 2}
    )
    running = loop.run(start_coordinator(config, [w.address for w in workers], port=0))
    assert running.http is not None
    yield f"http://127.0.0.1:{running.http.port}"
    loop.run(running.stop(grace=0))


def test_fuzzed_bodies_get_2xx_or_4xx_never_5xx(fuzz_url: str) -> None:
    statuses: list[int] = []

    @settings(max_examples=150, deadline=None, database=None)
    @given(posts())
    def post(path_and_body: tuple[str, Any]) -> None:
        path, body = path_and_body
        status, reply = _post_raw(f"{fuzz_url}{path}", json.dumps(body).encode())
        assert 200 <= status < 300 or 400 <= status < 500, (status, reply[:500])
        if status >= 400:
            assert json.loads(reply)["error"]["message"]
        statuses.append(status)

    post()
    assert 200 in statuses and 400 in statuses  # the bodies reach both outcomes
    good = {"model": "chorus", "prompt": "48+27=", "max_tokens": 4, "temperature": 0}
    status, reply = _post(f"{fuzz_url}/v1/completions", json.dumps(good).encode())
    assert status == 200 and reply["choices"][0]["text"] == "75", reply  # still serving


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
