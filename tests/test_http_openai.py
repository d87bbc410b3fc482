"""OpenAI API details of the HTTP front end, with the official `openai` client against real coordinators:
logprobs, n, stream_options, OpenAI's defaults, `model` (the ensemble or one member), refused fields and
roles, an error in the middle of a stream, bearer tokens and TLS."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

import chorus
from chorus_common.security import bearer_allowed
from chorus_local.cluster import WorkerProcess, start_coordinator
from tests.certs import issue, make_ca
from tests.cluster_helpers import MODELS, LoopThread, make_config, worker
from tests.reference import END, ReferenceModel
from tests.tiny_models import never_ending_llama

PLAIN = {"apply_chat_template": False}  # chat without the template: the arithmetic models answer sums


def _start(loop: LoopThread, workers: list[WorkerProcess], **top: Any) -> Any:
    config = make_config(workers, http={"enabled": True, "port": 0, **top.pop("http", {})}, **top)
    running = loop.run(start_coordinator(config, [w.address for w in workers], port=0))
    assert running.http is not None
    return running


def _client(running: Any, **kwargs: Any) -> openai.OpenAI:
    base = f"http://127.0.0.1:{running.http.port}/v1"
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def both(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> Iterator[Any]:
    """A coordinator over both embedded models, float32 transport (logprobs compared to 1e-4), no
    `defaults:` in its config (OpenAI's defaults apply over HTTP)."""
    running = _start(loop, [default_workers["arith-bpe"], default_workers["arith-sp"]], transport={"dtype": "float32"})
    yield running
    loop.run(running.stop(grace=0))


@pytest.fixture(scope="module")
def alone(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> Iterator[Any]:
    """A coordinator whose config has arith-sp alone."""
    running = _start(loop, [default_workers["arith-sp"]], transport={"dtype": "float32"})
    yield running
    loop.run(running.stop(grace=0))


@pytest.fixture()
def client(both: Any) -> openai.OpenAI:
    return _client(both)


# --- logprobs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references() -> list[ReferenceModel]:
    return [ReferenceModel(MODELS / name) for name in ("arith-bpe", "arith-sp")]


def _reference_logprobs(
    models: list[ReferenceModel], prompt: str, steps: int, top: int
) -> list[tuple[bytes, float, list[tuple[bytes | None, float]]]]:
    """Greedy GaC with equal weights as tests/reference.py computes it, with each step's mixed distribution:
    the chosen entry's log-probability and the `top` most likely entries. As the coordinator mixes, each
    model's distribution over text entries is weighed as it is (the mass of its special tokens is not
    spread over the rest), and the mix is normalised."""
    states = [m.start(prompt) for m in models]
    out = []
    for _ in range(steps):
        dists = [model.next_bytes(state) for model, state in zip(models, states, strict=True)]
        mixed: dict[bytes | None, float] = {}
        for dist in dists:
            for key, p in dist.items():
                mixed[key] = mixed.get(key, 0.0) + p / len(models)
        total = sum(mixed.values())
        ranked = sorted(mixed.items(), key=lambda kv: -kv[1])
        choice = ranked[0][0]
        if choice is END:
            break
        out.append((choice, math.log(mixed[choice] / total), [(k, math.log(p / total)) for k, p in ranked[:top]]))
        share = mixed[choice] / total
        for model, state, dist in zip(models, states, dists, strict=True):
            mine = dist.get(choice, 0.0) / sum(dist.values())
            model.commit(state, choice, partial=mine < 0.5 * share)
    return out


@pytest.mark.parametrize("prompt", ["48+27=", "99+99=", "1", "9+"])
def test_logprobs_are_the_ensembles_mixed_distribution(
    client: openai.OpenAI, references: list[ReferenceModel], prompt: str
) -> None:
    """Greedy: each token's logprob and top_logprobs are the mix of the models' distributions, as an
    independent reference computes it (transformers, no KV cache, plain dicts)."""
    expected = _reference_logprobs(references, prompt, 8, 5)
    reply = client.completions.create(model="chorus", prompt=prompt, max_tokens=8, temperature=0, logprobs=5)
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.tokens == [token.decode() for token, _, _ in expected]
    assert reply.choices[0].text == "".join(lp.tokens)
    assert reply.usage is not None and len(lp.tokens) == reply.usage.completion_tokens
    for got, top, (_, logprob, alternatives) in zip(lp.token_logprobs, lp.top_logprobs, expected, strict=True):
        assert got == pytest.approx(logprob, abs=1e-5)
        assert list(top) == [(b"<|end|>" if k is None else k).decode() for k, _ in alternatives]
        assert list(top.values()) == pytest.approx([p for _, p in alternatives], abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_logprobs_have_openais_shape_and_streaming_carries_the_same(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "1"}]
    kwargs: Any = {"model": "chorus", "messages": messages, "max_tokens": 6, "seed": 4, "extra_body": PLAIN}
    reply = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=3)
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
    content = reply.choices[0].logprobs.content
    assert reply.usage is not None and len(content) == reply.usage.completion_tokens > 1
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:
        assert t.bytes == list(t.token.encode()) and t.logprob < 0
        assert len(t.top_logprobs) == 3 and [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True
        )
        assert all(a.bytes == list(a.token.encode()) for a in t.top_logprobs if a.bytes is not None)
    # Sampled at temperature 1 from the whole mix: the drawn token is one of the alternatives or below them.
    assert all(t.logprob <= t.top_logprobs[0].logprob + 1e-12 for t in content)
    chunks = list(client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [(t.token, t.bytes, [a.token for a in t.top_logprobs]) for t in streamed] == [
        (t.token, t.bytes, [a.token for a in t.top_logprobs]) for t in content
    ]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-9)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    # Not asked: none, at no cost.
    plain = client.chat.completions.create(**kwargs)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content
    assert all(c.choices[0].logprobs is None for c in client.chat.completions.create(**kwargs, stream=True))
    no_top = client.chat.completions.create(**kwargs, logprobs=True)
    assert no_top.choices[0].logprobs is not None and no_top.choices[0].logprobs.content is not None
    assert [t.top_logprobs for t in no_top.choices[0].logprobs.content] == [[] for _ in content]


def test_streamed_completion_logprobs_add_up_to_the_whole(client: openai.OpenAI) -> None:
    kwargs: Any = {"model": "chorus", "prompt": ["1", "48+27="], "max_tokens": 6, "seed": 9, "logprobs": 2}
    whole = client.completions.create(**kwargs)
    parts: dict[int, dict[str, list[Any]]] = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                into = parts.setdefault(choice.index, {})
                for key, value in choice.logprobs.model_dump().items():
                    into.setdefault(key, []).extend(value)
    for choice in whole.choices:
        assert choice.logprobs is not None
        want, got = choice.logprobs.model_dump(), parts[choice.index]
        assert (got["tokens"], got["text_offset"]) == (want["tokens"], want["text_offset"])
        # Both prompts run at once: the worker's batches (so the last bits of a float) may differ between runs.
        assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-5)
        assert [list(t) for t in got["top_logprobs"]] == [list(t) for t in want["top_logprobs"]]
        for top, expected in zip(got["top_logprobs"], want["top_logprobs"], strict=True):
            assert list(top.values()) == pytest.approx(list(expected.values()), abs=1e-5)


def test_logprobs_are_of_the_distribution_sampled_from(client: openai.OpenAI) -> None:
    """Sampling: the tempered distribution, cut to top_p, is what the token is drawn from and what is reported
    (greedy: the mix itself)."""

    def first(**kwargs: Any) -> dict[str, float]:
        reply = client.completions.create(model="chorus", prompt="48+27=", max_tokens=1, logprobs=5, seed=1, **kwargs)
        lp = reply.choices[0].logprobs
        assert lp is not None and lp.top_logprobs is not None and lp.token_logprobs is not None and lp.tokens
        assert lp.token_logprobs[0] == lp.top_logprobs[0][lp.tokens[0]]  # the drawn token is among them here
        return dict(lp.top_logprobs[0])

    mix = first(temperature=0)
    assert mix == pytest.approx(first(temperature=1))  # temperature 1 changes nothing
    half = first(temperature=0.5)  # p^(1/T), renormalised: log-ratios double
    assert list(half) == list(mix)
    base = next(iter(mix))
    for token in mix:
        assert half[token] - half[base] == pytest.approx(2 * (mix[token] - mix[base]), abs=1e-6)
    assert sum(math.exp(v) for v in half.values()) < 1
    # top_p 0.6 keeps "7" and "75" (0.46 + 0.26 of the mix): renormalised, the whole distribution drawn from.
    nucleus = first(temperature=1, top_p=0.6)
    assert list(nucleus) == list(mix)[:2]
    assert sum(math.exp(v) for v in nucleus.values()) == pytest.approx(1.0)
    tokens = list(nucleus)
    assert nucleus[tokens[0]] - nucleus[tokens[1]] == pytest.approx(mix[tokens[0]] - mix[tokens[1]], abs=1e-6)


@pytest.mark.parametrize("strategy", ["safe", "me"])
def test_logprobs_are_refused_for_strategies_that_draft(client: openai.OpenAI, strategy: str) -> None:
    """SAFE and ME accept tokens a model drew in its worker: no distribution of the ensemble to report."""
    body: Any = {"strategy": strategy}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="chorus", prompt="1", max_tokens=3, temperature=1, logprobs=1, extra_body=body)
    assert _error(caught.value)["param"] == "logprobs" and strategy in _error(caught.value)["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        messages: Any = [{"role": "user", "content": "1"}]
        client.chat.completions.create(model="chorus", messages=messages, temperature=1, logprobs=True, extra_body=body)
    assert _error(caught.value)["param"] == "logprobs"
    ok = client.completions.create(model="chorus", prompt="1", max_tokens=3, temperature=1, seed=0, extra_body=body)
    assert ok.choices[0].logprobs is None and ok.usage is not None and ok.usage.completion_tokens > 0


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict), body
    return body  # the openai client unwraps {"error": {...}}


# --- n, stream_options, defaults --------------------------------------------------------------------


def test_n_samples_are_seeded_seed_plus_j(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "1"}]
    kwargs: Any = {"model": "chorus", "messages": messages, "max_tokens": 6, "extra_body": PLAIN}
    three = client.chat.completions.create(**kwargs, n=3, seed=11)
    assert [c.index for c in three.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(**kwargs, seed=11 + j) for j in range(3)]
    assert [c.message.content for c in three.choices] == [r.choices[0].message.content for r in alone]
    assert len({c.message.content for c in three.choices}) > 1  # independent samples
    assert three.usage is not None and alone[0].usage is not None
    assert three.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == sum(r.usage.completion_tokens for r in alone if r.usage)
    greedy = client.chat.completions.create(**kwargs, n=2, temperature=0)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content  # as OpenAI's
    # Completions: each prompt's n samples, indexed prompt * n + j.
    batch = client.completions.create(model="chorus", prompt=["1", "9+"], max_tokens=5, n=2, seed=3)
    singles = [
        client.completions.create(model="chorus", prompt=p, max_tokens=5, seed=3 + j).choices[0].text
        for p in ("1", "9+")
        for j in range(2)
    ]
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == singles
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="chorus", prompt=["1"] * 40, max_tokens=1, n=2)  # 80 > 64 conversations
    assert _error(caught.value)["param"] == "n"


def test_stream_options_include_usage_sends_a_final_usage_chunk(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "48+27="}]
    chat: Any = {"model": "chorus", "messages": messages, "max_tokens": 4, "seed": 2, "extra_body": PLAIN}
    whole = client.chat.completions.create(**chat, n=2)
    chunks = list(client.chat.completions.create(**chat, n=2, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1]) and all(c.choices for c in chunks[:-1])
    assert all(c.usage is None and c.choices for c in client.chat.completions.create(**chat, stream=True))
    completion: Any = {"model": "chorus", "prompt": ["48+27=", "1"], "max_tokens": 4, "seed": 2}
    whole_text = client.completions.create(**completion)
    chunks_text = list(client.completions.create(**completion, stream=True, stream_options={"include_usage": True}))
    assert chunks_text[-1].choices == [] and chunks_text[-1].usage is not None and whole_text.usage is not None
    assert chunks_text[-1].usage.model_dump() == whole_text.usage.model_dump()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**chat, stream_options={"include_usage": True})  # not streaming
    assert _error(caught.value)["param"] == "stream_options"


def test_openais_defaults_apply_where_the_config_sets_none(client: openai.OpenAI) -> None:
    """The config has no `defaults:`: temperature 1 (OpenAI's), not the gRPC API's greedy default."""
    kwargs: Any = {"model": "chorus", "prompt": "1", "max_tokens": 6}
    greedy = client.completions.create(**kwargs, temperature=0).choices[0].text
    defaults = [client.completions.create(**kwargs, seed=s).choices[0].text for s in range(4)]
    assert defaults == [client.completions.create(**kwargs, seed=s, temperature=1).choices[0].text for s in range(4)]
    assert any(text != greedy for text in defaults)


@pytest.fixture(scope="module")
def short_context(loop: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A never-ending model with a 128-token context."""
    w = worker(never_ending_llama(tmp_path_factory.mktemp("short"), MODELS / "arith-sp", context=128), "short")
    yield w
    w.stop()


def test_without_max_tokens_generation_runs_to_the_context_or_the_configured_limit(
    loop: LoopThread, short_context: WorkerProcess
) -> None:
    running = _start(loop, [short_context])
    try:
        reply = _client(running).completions.create(model="chorus", prompt="hello", seed=0)
        assert reply.usage is not None and reply.choices[0].finish_reason == "length"
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 128  # the context, full
    finally:
        loop.run(running.stop(grace=0))
    running = _start(loop, [short_context], limits={"max_new_tokens": 64})
    try:
        reply = _client(running).completions.create(model="chorus", prompt="hello", seed=0)
        assert reply.usage is not None and reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 64  # the limit, before the context
    finally:
        loop.run(running.stop(grace=0))
    # The config's own defaults win over OpenAI's.
    running = _start(loop, [short_context], defaults={"max_new_tokens": 5, "temperature": 0.0})
    try:
        c = _client(running)
        reply = c.completions.create(model="chorus", prompt="hello")
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        greedy = c.completions.create(model="chorus", prompt="hello", temperature=0, max_tokens=5)
        assert reply.choices[0].text == greedy.choices[0].text
        assert [c.completions.create(model="chorus", prompt="hello", seed=s).choices[0].text for s in range(3)] == [
            greedy.choices[0].text
        ] * 3
    finally:
        loop.run(running.stop(grace=0))


# --- model: the ensemble or one member -------------------------------------------------------------


SAMPLINGS = [{"temperature": 0}, {"temperature": 1, "seed": 5}, {"temperature": 0.7, "seed": 8, "top_p": 0.9}]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_a_member_alone_equals_that_member_served_alone(both: Any, alone: Any, sampling: dict[str, Any]) -> None:
    ensemble, single = _client(both), _client(alone)
    for prompt in ("12+35=", "1", "hello"):
        kwargs: Any = {"prompt": prompt, "max_tokens": 8, "logprobs": 3, **sampling}
        member = ensemble.completions.create(model="arith-sp", **kwargs)
        served_alone = single.completions.create(model="chorus", **kwargs)
        assert member.choices[0].text == served_alone.choices[0].text
        assert member.choices[0].logprobs is not None and served_alone.choices[0].logprobs is not None
        got, want = member.choices[0].logprobs, served_alone.choices[0].logprobs
        assert (got.tokens, got.text_offset) == (want.tokens, want.text_offset)
        assert got.token_logprobs == pytest.approx(want.token_logprobs, rel=1e-12, abs=1e-12)  # sums in another order
        assert [list(t) for t in got.top_logprobs or []] == [list(t) for t in want.top_logprobs or []]
        assert member.model == "arith-sp"
    messages: Any = [{"role": "user", "content": "7+86="}]
    chat = ensemble.chat.completions.create(model="arith-sp", messages=messages, max_tokens=6, **sampling)
    chat_alone = single.chat.completions.create(model="chorus", messages=messages, max_tokens=6, **sampling)
    assert chat.choices[0].message.content == chat_alone.choices[0].message.content


def test_members_answer_their_own_way_and_through_grpc_too(both: Any) -> None:
    c = _client(both)
    answers = {
        m: c.completions.create(model=m, prompt="12+35=", max_tokens=4, temperature=0).choices[0].text
        for m in ("arith-sp", "arith-bpe")
    }
    assert answers == {"arith-sp": "47", "arith-bpe": "48"}
    with chorus.Client(f"127.0.0.1:{both.port}", timeout=60) as sdk:
        for name, text in answers.items():
            result = sdk.generate(prompt="12+35=", max_new_tokens=4, temperature=0, model=name)
            assert result.text == text
            assert [m.name for m in result.usage.models] == [name]  # placed on that member only
        whole = sdk.generate(prompt="12+35=", max_new_tokens=4, temperature=0, model="chorus")
        assert [m.name for m in whole.usage.models] == ["arith-bpe", "arith-sp"]
        with pytest.raises(chorus.InvalidArgument, match="model"):
            sdk.generate(prompt="1", model="gpt-4")
    # A member alone has no other model to weigh.
    with pytest.raises(openai.BadRequestError) as caught:
        c.completions.create(model="arith-sp", prompt="1", max_tokens=2, extra_body={"weights": {"arith-bpe": 2}})
    assert _error(caught.value)["param"] == "weights"


def test_a_mix_is_the_weighted_average_of_its_members(both: Any) -> None:
    """Black box: the ensemble's first-token distribution against each member's alone (top 20 each)."""
    c = _client(both)

    def first(model: str, **extra: Any) -> dict[str, float]:
        reply = c.completions.create(model=model, prompt="1", max_tokens=1, temperature=0, logprobs=20, **extra)
        lp = reply.choices[0].logprobs
        assert lp is not None and lp.top_logprobs is not None
        return {k: math.exp(v) for k, v in lp.top_logprobs[0].items()}

    bpe, sp = first("arith-bpe"), first("arith-sp")
    for weights in ({"arith-bpe": 1, "arith-sp": 1}, {"arith-bpe": 3, "arith-sp": 1}):
        w = weights["arith-bpe"] / sum(weights.values())
        mix = first("chorus", extra_body={"weights": weights})
        assert len(mix) == 20
        for token, p in mix.items():
            # A token outside a member's top 20 has at most that member's 20th probability there.
            low = w * bpe.get(token, 0.0) + (1 - w) * sp.get(token, 0.0)
            high = w * bpe.get(token, min(bpe.values())) + (1 - w) * sp.get(token, min(sp.values()))
            assert low - 1e-6 <= p <= high + 1e-6, (token, p, low, high)
        both_have = [t for t in mix if t in bpe and t in sp]
        assert len(both_have) >= 5
        for token in both_have:
            assert mix[token] == pytest.approx(w * bpe[token] + (1 - w) * sp[token], abs=1e-6)


def test_unknown_models_are_404_in_openais_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "1"}])
    error = _error(caught.value)
    assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "invalid_request_error")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="arith", prompt="1")
    entries = {m.id: (m.model_extra or {})["chorus"] for m in client.models.list()}
    assert entries["chorus"]["kind"] == "ensemble" and entries["chorus"]["members"] == ["arith-bpe", "arith-sp"]
    assert {entries[n]["kind"] for n in ("arith-bpe", "arith-sp")} == {"member"}
    assert entries["arith-sp"]["ensemble"] == "chorus" and entries["arith-sp"]["weight"] == 0.5


# --- roles and fields the server cannot honour ------------------------------------------------------

REFUSED_CHAT = [
    ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("parallel_tool_calls", True),
    ("logit_bias", {"12": 5}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "75"}),
    ("frequency_penalty", 0.5),
    ("presence_penalty", -1),
    ("reasoning_effort", "low"),
    ("web_search_options", {}),
    ("store", True),
    ("service_tier", "flex"),
    ("top_logprobs", 2),  # without logprobs: true
    ("no_such_field", 1),
]
HONOURED_NO_OPS = {
    "frequency_penalty": 0,
    "presence_penalty": 0.0,
    "logit_bias": {},
    "store": False,
    "response_format": {"type": "text"},
    "modalities": ["text"],
    "service_tier": "auto",
    "tool_choice": None,
    "user": "user-7",
    "metadata": {"team": "a"},
}


@pytest.mark.parametrize(("field", "value"), REFUSED_CHAT, ids=[f for f, _ in REFUSED_CHAT])
def test_chat_fields_that_cannot_be_honoured_are_400_naming_them(client: openai.OpenAI, field: str, value: Any) -> None:
    messages: Any = [{"role": "user", "content": "48+27="}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chorus", messages=messages, max_tokens=2, extra_body={field: value})
    assert _error(caught.value)["param"] == field and field in _error(caught.value)["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("echo", True),
        ("best_of", 2),
        ("suffix", "x"),
        ("logit_bias", {"1": 1}),
        ("top_logprobs", 2),
        ("logprobs", True),
    ],
)
def test_completion_fields_that_cannot_be_honoured_are_400_naming_them(
    client: openai.OpenAI, field: str, value: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="chorus", prompt="1", max_tokens=2, extra_body={field: value})
    assert _error(caught.value)["param"] == field


def test_no_op_values_and_caller_ids_are_accepted(client: openai.OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    messages: Any = [{"role": "user", "content": "48+27="}]
    base = client.chat.completions.create(model="chorus", messages=messages, max_tokens=3, temperature=0)
    with caplog.at_level(logging.INFO, logger="coordinator.http_api"):
        reply = client.chat.completions.create(
            model="chorus",
            messages=messages,
            max_tokens=3,
            temperature=0,
            extra_body=HONOURED_NO_OPS,
            extra_headers={"X-Request-Id": "caller-ids-1"},
        )
    assert reply.choices[0].message.content == base.choices[0].message.content
    (record,) = [r for r in caplog.records if getattr(r, "request_id", None) == "caller-ids-1"]
    assert record.__dict__["user"] == "user-7" and record.__dict__["metadata"] == {"team": "a"}  # in the log line


def test_roles_developer_is_system_and_tool_messages_are_refused(client: openai.OpenAI) -> None:
    def usage(messages: Any) -> Any:
        reply = client.chat.completions.create(model="chorus", messages=messages, max_tokens=3, temperature=0)
        return reply.choices[0].message.content, reply.usage and reply.usage.prompt_tokens

    question = {"role": "user", "content": "48+27="}
    system = usage([{"role": "system", "content": "Add."}, question])
    assert usage([{"role": "developer", "content": "Add."}, question]) == system
    assert usage([{"role": "user", "content": "Add."}, question])[1] != system[1]  # the role reaches the template
    # An assistant message echoed back with the client's null fields is accepted.
    echoed = {"role": "assistant", "content": "75", "refusal": None, "tool_calls": None, "function_call": None}
    assert usage([question, echoed, question])[1]
    refused: list[tuple[Any, str]] = [
        ([question, {"role": "tool", "content": "75", "tool_call_id": "c1"}], "messages[1].role"),
        ([question, {"role": "function", "content": "75", "name": "f"}], "messages[1].role"),
        (
            [
                question,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
            ],
            "messages[1].tool_calls",
        ),
        ([{"role": "user", "content": "1", "name": "ann"}], "messages[0].name"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
            "messages[0].content[0]",
        ),
        ([{"role": "wizard", "content": "1"}], "messages[0].role"),
    ]
    for messages, param in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="chorus", messages=messages, max_tokens=2)
        assert _error(caught.value)["param"] == param, messages
    parts = [{"type": "text", "text": "48+"}, {"type": "text", "text": "27="}]
    assert usage([{"role": "user", "content": parts}]) == usage([question])


# --- errors: before the first chunk an HTTP status, after it an SSE error event --------------------


def test_a_stream_that_fails_at_once_gets_an_http_status(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "9.11 and 9.9, which is bigger? " * 4}]  # past the 64-token context
    with pytest.raises(openai.BadRequestError, match="context"):
        list(client.chat.completions.create(model="chorus", messages=long, max_tokens=4, stream=True))  # type: ignore[arg-type]


def test_a_worker_lost_mid_stream_ends_the_stream_with_an_error_event(loop: LoopThread, tmp_path: Path) -> None:
    victim = worker(never_ending_llama(tmp_path / "endless", MODELS / "arith-sp", context=8192), "victim")
    running = _start(loop, [victim], limits={"max_new_tokens": 8000})
    try:
        stream = _client(running).completions.create(model="chorus", prompt="hello", max_tokens=8000, stream=True)
        text = ""
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                text += chunk.choices[0].text if chunk.choices else ""
                if text and victim.process.poll() is None:
                    os.kill(victim.process.pid, signal.SIGKILL)
        assert text  # text arrived before the error
        error = caught.value
        assert not isinstance(error, openai.APIStatusError)  # the 200 stream's own event, not a status
        assert isinstance(error.body, dict) and error.body["type"] == "service_unavailable"
        assert "victim" in error.body["message"] and "lost" in error.body["message"]
    finally:
        loop.run(running.stop(grace=0))
        victim.stop()


# --- bearer tokens and TLS ---------------------------------------------------------------------------


def test_bearer_allowed_matches_whole_tokens_only() -> None:
    tokens = (b"alpha", b"beta")
    assert bearer_allowed("Bearer alpha", tokens) and bearer_allowed("bearer beta", tokens)
    for header in ("", "Bearer", "Bearer ", "Bearer alph", "Bearer alphaa", "Basic alpha", "alpha", "Bearer gamma"):
        assert not bearer_allowed(header, tokens), header


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory)
    tokens = directory / "tokens"
    tokens.write_text("# HTTP and gRPC clients\nalpha-token\nbeta-token\n")
    return {
        "ca": ca,
        "server": issue(ca, "server", server=True),
        "http": issue(ca, "http-own", server=True),
        "client": issue(ca, "client", server=False),
        "tokens": tokens,
        "stranger": issue(make_ca(directory, "other-ca"), "stranger", server=False),
    }


def _https(running: Any, ca: Path, api_key: str, cert: Path | None = None) -> openai.OpenAI:
    context = ssl.create_default_context(cafile=ca.with_suffix(".crt"))
    if cert is not None:
        context.load_cert_chain(cert.with_suffix(".crt"), cert.with_suffix(".key"))
    return openai.OpenAI(
        base_url=f"https://127.0.0.1:{running.http.port}/v1",
        api_key=api_key,
        max_retries=0,
        timeout=30,
        http_client=httpx2.Client(verify=context),
    )


def test_http_requires_the_grpc_tokens_over_the_grpc_tls(
    loop: LoopThread, default_workers: dict[str, WorkerProcess], pki: dict[str, Path]
) -> None:
    server = pki["server"]
    tls = {"tls_cert": str(server.with_suffix(".crt")), "tls_key": str(server.with_suffix(".key"))}
    running = _start(loop, [default_workers["arith-bpe"]], server={"port": 0, **tls, "tokens_file": str(pki["tokens"])})
    try:
        assert running.http.tls
        for token in ("alpha-token", "beta-token"):
            reply = _https(running, pki["ca"], token).completions.create(
                model="chorus", prompt="48+27=", max_tokens=3, temperature=0
            )
            assert reply.choices[0].text
        for wrong in ("alpha-tokenx", "alpha", "beta-token alpha-token"):
            with pytest.raises(openai.AuthenticationError) as caught:
                _https(running, pki["ca"], wrong).models.list()
            assert _error(caught.value)["code"] == "invalid_api_key"
        context = ssl.create_default_context(cafile=pki["ca"].with_suffix(".crt"))
        base = f"https://127.0.0.1:{running.http.port}"
        with httpx2.Client(verify=context) as raw:
            for path in ("/v1/models", "/status", "/v1/chat/completions", "/api/generate/"):
                answer = raw.request("GET" if path in ("/v1/models", "/status") else "POST", base + path, json={})
                assert answer.status_code == 401, path
                assert answer.headers["WWW-Authenticate"] == "Bearer"
                assert answer.json()["error"]["code"] == "invalid_api_key"
            basic = raw.get(base + "/v1/models", headers={"Authorization": "Basic alpha-token"})
            assert basic.status_code == 401
            good = raw.get(base + "/status", headers={"Authorization": "Bearer alpha-token"})
            assert good.status_code == 200
        # Not TLS, or a CA the client does not trust: no answer at all.
        plain = openai.OpenAI(
            base_url=f"http://127.0.0.1:{running.http.port}/v1", api_key="alpha-token", max_retries=0, timeout=10
        )
        with pytest.raises(openai.APIConnectionError):
            plain.models.list()
        with pytest.raises(openai.APIConnectionError):
            _https(running, pki["stranger"].parent / "other-ca", "alpha-token").models.list()
        # gRPC takes the same token.
        with chorus.Client(
            f"localhost:{running.port}", tls_ca=str(pki["ca"].with_suffix(".crt")), token="beta-token", timeout=30
        ) as sdk:
            assert sdk.generate(prompt="48+27=", max_new_tokens=3, temperature=0).text == reply.choices[0].text
    finally:
        loop.run(running.stop(grace=0))


def test_http_with_its_own_certificate_and_client_certificates(
    loop: LoopThread, default_workers: dict[str, WorkerProcess], pki: dict[str, Path]
) -> None:
    own, ca = pki["http"], pki["ca"]
    http = {
        "tls_cert": str(own.with_suffix(".crt")),
        "tls_key": str(own.with_suffix(".key")),
        "client_ca": str(ca.with_suffix(".crt")),
    }
    running = _start(loop, [default_workers["arith-bpe"]], http=http)  # gRPC stays plaintext
    try:
        context = ssl.create_default_context(cafile=ca.with_suffix(".crt"))
        context.load_cert_chain(pki["client"].with_suffix(".crt"), pki["client"].with_suffix(".key"))
        with (
            socket.create_connection(("127.0.0.1", running.http.port), timeout=10) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            served = tls.getpeercert(binary_form=True)
        assert served == ssl.PEM_cert_to_DER_cert(own.with_suffix(".crt").read_text())  # http's, not server's
        reply = _https(running, ca, "unused", cert=pki["client"]).completions.create(
            model="chorus", prompt="48+27=", max_tokens=3, temperature=0
        )
        assert reply.choices[0].text
        for cert in (None, pki["stranger"]):  # no client certificate, or one another CA signed
            with pytest.raises(openai.APIConnectionError):
                _https(running, ca, "unused", cert=cert).models.list()
    finally:
        loop.run(running.stop(grace=0))
