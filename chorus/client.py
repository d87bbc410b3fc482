"""The Chorus client SDK: `Client` (blocking) and `AsyncClient` (asyncio). No torch needed.

import chorus
with chorus.Client("localhost:50051") as client:
    print(client.generate(prompt="12+35=").text)

Every call has a deadline (`DEFAULT_TIMEOUT` unless given) and is retried with exponential backoff
on UNAVAILABLE and RESOURCE_EXHAUSTED (`RetryPolicy`), but only before its first response arrives.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import time
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from chorus.errors import from_rpc_error, retry_hint
from chorus.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

Message = Mapping[str, str]  # {"role": ..., "content": ...}
_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
# Pings keep idle connections open through NATs and load balancers and spot a dead server within
# ~40 s. A server must accept them: chorus_common.serving allows pings every 10 s, with or without calls.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # 0 = no limit: keep pinging an idle connection
]
# A restarted coordinator is reconnected to within a second, in time for RetryPolicy's retries, not after
# gRPC's default reconnect backoff (1 s growing to 2 min).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 5_000)]
DEFAULT_TIMEOUT = 600.0  # seconds: the deadline of every call unless the client or the call says otherwise
LOAD_BALANCING = ("pick_first", "round_robin")
_SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_GRPC_MAX_ATTEMPTS = 5  # gRPC's own retries (used for the unary Models) cap attempts here


class _Unset(enum.Enum):
    TOKEN = 0


_UNSET = _Unset.TOKEN  # a call's timeout when not given: the client's
Timeout = float | _Unset | None  # a call's timeout: seconds, None = no deadline, or not given


@dataclass(frozen=True)
class RetryPolicy:
    """How calls are retried on UNAVAILABLE and RESOURCE_EXHAUSTED, only ever before the call's first
    response arrived (a stream that has yielded text is never retried). Attempt n+1 waits the server's
    hint (`retry-after` trailing metadata, seconds) if it sent one, else random(0, min(initial_backoff *
    multiplier**(n-1), max_backoff)) seconds, as gRPC's own retries do. All attempts share the call's
    deadline: no retry is started that the deadline would cut. Models uses gRPC's retry policy, which
    caps attempts at 5."""

    max_attempts: int = 5  # the first try included; 1 = no retries
    initial_backoff: float = 0.2  # seconds
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1 (got {self.max_attempts!r})")
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError(
                f"need 0 < initial_backoff <= max_backoff (got {self.initial_backoff!r}, {self.max_backoff!r})"
            )
        if not self.multiplier >= 1:
            raise ValueError(f"multiplier must be >= 1 (got {self.multiplier!r})")

    @classmethod
    def of(cls, retries: int | RetryPolicy) -> RetryPolicy:
        """`retries` as a policy: an integer is a number of retries (0 = none) with the default backoff."""
        if isinstance(retries, RetryPolicy):
            return retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a RetryPolicy or an integer >= 0 (got {retries!r})")
        return cls(max_attempts=retries + 1)

    def backoff(self, attempt: int) -> float:
        """The jittered wait after failed attempt `attempt` (1-based), with no hint from the server."""
        return random.uniform(0.0, min(self.initial_backoff * self.multiplier ** (attempt - 1), self.max_backoff))


@dataclass(frozen=True)
class ModelUsage:
    name: str
    prompt_tokens: int
    forward_passes: int
    tokens_fed: int


@dataclass(frozen=True)
class Usage:
    completion_tokens: int
    steps: int
    steps_ensembled: int
    models: tuple[ModelUsage, ...]
    elapsed_ms: float
    lost_models: tuple[str, ...]  # models whose worker was lost during the request (on_worker_loss="degrade")


@dataclass(frozen=True)
class Result:
    text: str
    finish_reason: str  # "stop" or "length"
    usage: Usage
    request_id: str  # as in the servers' logs


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str
    vocab_size: int
    tokenizer_kind: str
    priority: str
    weight: float
    addresses: tuple[str, ...]
    device: str


@dataclass(frozen=True)
class EnsembleInfo:
    models: tuple[ModelInfo, ...]
    strategy: str
    strategies: tuple[str, ...]
    union_vocab_size: int
    ready: bool


@dataclass
class _Results:
    """Final results of a Generate stream, by conversation index."""

    by_index: dict[int, Result] = field(default_factory=dict)

    def add(self, response: coordinator_pb2.GenerateResponse) -> None:
        if response.HasField("done"):
            self.by_index[response.index] = _result(response.done)

    def in_order(self) -> list[Result]:
        return [self.by_index[i] for i in sorted(self.by_index)]


def build_request(
    prompt: str | None = None,
    messages: Sequence[Message] | None = None,
    conversations: Sequence[Sequence[Message]] | None = None,
    *,
    max_new_tokens: int | None = None,
    strategy: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    apply_chat_template: bool | None = None,
    threshold: float | None = None,
    request_id: str | None = None,
    on_worker_loss: str | None = None,
    weights: Mapping[str, float] | None = None,
    model: str | None = None,
) -> coordinator_pb2.GenerateRequest:
    given = [x is not None for x in (prompt, messages, conversations)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, messages or conversations")
    request = coordinator_pb2.GenerateRequest(
        strategy=strategy or "", request_id=request_id or "", on_worker_loss=on_worker_loss or "", model=model or ""
    )
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.messages.CopyFrom(_conversation(messages))
    else:
        request.batch.conversations.extend(_conversation(c) for c in conversations or ())
    optional: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "apply_chat_template": apply_chat_template,
        "threshold": threshold,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(request, name, value)
    if stop is not None:
        request.stop.extend([stop] if isinstance(stop, str) else stop)
    if weights:
        request.weights.update(weights)
    return request


def _conversation(messages: Sequence[Message]) -> common_pb2.Conversation:
    return common_pb2.Conversation(
        messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    )


def _result(done: coordinator_pb2.Completion) -> Result:
    u = done.usage
    usage = Usage(
        completion_tokens=u.completion_tokens,
        steps=u.steps,
        steps_ensembled=u.steps_ensembled,
        models=tuple(ModelUsage(m.name, m.prompt_tokens, m.forward_passes, m.tokens_fed) for m in u.models),
        elapsed_ms=u.elapsed_ms,
        lost_models=tuple(u.lost_models),
    )
    return Result(text=done.text, finish_reason=done.finish_reason, usage=usage, request_id=done.request_id)


def _ensemble(response: coordinator_pb2.ModelsResponse) -> EnsembleInfo:
    return EnsembleInfo(
        models=tuple(
            ModelInfo(
                name=m.name,
                fingerprint=m.fingerprint,
                vocab_size=m.vocab_size,
                tokenizer_kind=m.tokenizer_kind,
                priority=m.priority,
                weight=m.weight,
                addresses=tuple(m.addresses),
                device=m.device,
            )
            for m in response.models
        ),
        strategy=response.strategy,
        strategies=tuple(response.strategies),
        union_vocab_size=response.union_vocab_size,
        ready=response.ready,
    )


class _Ending:
    """How a stream ended: `result` once it is exhausted, None before (or if it failed)."""

    result: Result | None

    @property
    def finish_reason(self) -> str | None:
        return None if self.result is None else self.result.finish_reason

    @property
    def usage(self) -> Usage | None:
        return None if self.result is None else self.result.usage

    @property
    def request_id(self) -> str | None:
        return None if self.result is None else self.result.request_id


class Stream(_Ending):
    """What `Client.stream` returns: an iterator of text pieces as they are generated. Once it is
    exhausted, `result` holds the final `Result` (and `finish_reason`, `usage`, `request_id` its
    fields); before that they are None. `close()` (or leaving a `with` block) cancels the call."""

    def __init__(self, responses: Generator[coordinator_pb2.GenerateResponse, None, None]) -> None:
        self._responses = responses
        self._results = _Results()
        self.result: Result | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        for response in self._responses:
            self._results.add(response)
            if response.text:
                return response.text
        results = self._results.in_order()
        self.result = results[0] if results else None
        raise StopIteration

    def close(self) -> None:
        self._responses.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_Ending):
    """What `AsyncClient.stream` returns: `Stream` for `async for`; `aclose()` (or leaving an
    `async with` block) cancels the call."""

    def __init__(self, responses: AsyncGenerator[coordinator_pb2.GenerateResponse, None]) -> None:
        self._responses = responses
        self._results = _Results()
        self.result: Result | None = None

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str:
        async for response in self._responses:
            self._results.add(response)
            if response.text:
                return response.text
        results = self._results.in_order()
        self.result = results[0] if results else None
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._responses.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _credentials(ca: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials | None:
    """TLS to the coordinator: trust `ca` (None with cert/key = the system's roots); cert/key for mutual TLS."""
    if ca is None and cert is None:
        return None
    read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def _duration(seconds: float) -> str:
    return f"{seconds:.9f}s"  # protobuf JSON Duration


def service_config(retry: RetryPolicy, load_balancing: str | None) -> dict[str, Any]:
    """The channel's gRPC service config: the balancing policy, and gRPC's retries for the unary Models
    (Generate, a stream, is retried by the client itself: see RetryPolicy)."""
    config: dict[str, Any] = {}
    if load_balancing is not None:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if retry.max_attempts > 1:
        policy = {
            "maxAttempts": min(retry.max_attempts, _GRPC_MAX_ATTEMPTS),
            "initialBackoff": _duration(retry.initial_backoff),
            "maxBackoff": _duration(retry.max_backoff),
            "backoffMultiplier": retry.multiplier,
            "retryableStatusCodes": sorted(code.name for code in _RETRYABLE),
        }
        config["methodConfig"] = [{"name": [{"service": _SERVICE, "method": "Models"}], "retryPolicy": policy}]
    return config


def channel_options(retry: RetryPolicy, load_balancing: str | None) -> list[tuple[str, Any]]:
    if load_balancing is not None and load_balancing not in LOAD_BALANCING:
        raise ValueError(f"load_balancing must be one of {LOAD_BALANCING} or None (got {load_balancing!r})")
    return [
        *_OPTIONS,
        *KEEPALIVE_OPTIONS,
        *RECONNECT_OPTIONS,
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config(retry, load_balancing))),
        ("grpc.service_config_disable_resolution", 1),  # this config, not one from DNS TXT records
    ]


def _channel(module: Any, target: str, creds: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> Any:
    """A channel from grpc or grpc.aio: plaintext, or TLS with creds."""
    if creds is None:
        return module.insecure_channel(target, options=options)
    return module.secure_channel(target, creds, options=options)


def _auth(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


class _Attempts:
    """One call's retries: its deadline, shared by every attempt, and the wait before the next one."""

    def __init__(self, policy: RetryPolicy, timeout: float | None) -> None:
        self.policy = policy
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.made = 1

    def timeout(self) -> float | None:
        """What is left of the deadline, for the next attempt."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def wait(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before retrying after `error` (no response having arrived), or None: give up."""
        if error.code() not in _RETRYABLE or self.made >= self.policy.max_attempts:  # type: ignore[attr-defined]
            return None
        hint = retry_hint(error)
        delay = self.policy.backoff(self.made) if hint is None else hint
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None  # the deadline would end the retry before it began: fail now, with the server's reason
        self.made += 1
        return delay


class _Settings:
    """What both clients set up alike: the channel (with retries, balancing, keepalive), auth, deadline."""

    def __init__(
        self,
        module: Any,
        target: str,
        timeout: float | None,
        token: str | None,
        tls: tuple[str | None, str | None, str | None],
        retries: int | RetryPolicy,
        load_balancing: str | None,
    ) -> None:
        self._retry = RetryPolicy.of(retries)
        options = channel_options(self._retry, load_balancing)
        self._channel = _channel(module, target, _credentials(*tls), options)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._timeout = timeout
        self._metadata = _auth(token)

    def _call_timeout(self, timeout: Timeout) -> float | None:
        return self._timeout if timeout is _UNSET else timeout

    def _attempts(self, timeout: Timeout) -> _Attempts:
        return _Attempts(self._retry, self._call_timeout(timeout))


DEFAULT_RETRY = RetryPolicy()


class Client(_Settings):
    """Blocking client.

    `target`: "host:port", or "dns:///name:port" with `load_balancing="round_robin"` to spread calls
    over every address the name resolves to (a headless Service's pods), or "ipv4:a:p1,b:p2".
    `timeout` (seconds, default DEFAULT_TIMEOUT = 600) is the deadline of every call that gives none
    of its own; None means no deadline, here or per call. `retries`: a RetryPolicy, or a number of
    retries (0 = none). `token` is sent as a bearer token; `tls_ca` (and `tls_cert`/`tls_key` for
    mutual TLS) turn on TLS."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        retries: int | RetryPolicy = DEFAULT_RETRY,
        load_balancing: str | None = None,
    ) -> None:
        super().__init__(grpc, target, timeout, token, (tls_ca, tls_cert, tls_key), retries, load_balancing)

    def generate(self, prompt: str | None = None, *, timeout: Timeout = _UNSET, **kwargs: Any) -> Result:
        """Generate for one prompt (or `messages=[...]`); returns the whole result."""
        return self._collect(build_request(prompt, **kwargs), timeout)[0]

    def generate_batch(
        self, conversations: Sequence[Sequence[Message]], *, timeout: Timeout = _UNSET, **kwargs: Any
    ) -> list[Result]:
        """Generate for several conversations concurrently, in one call."""
        return self._collect(build_request(conversations=conversations, **kwargs), timeout)

    def stream(self, prompt: str | None = None, *, timeout: Timeout = _UNSET, **kwargs: Any) -> Stream:
        """Yield text pieces as they are generated; afterwards the stream's `result` (`finish_reason`,
        `usage`, `request_id`) says how it ended."""
        return Stream(self._responses(build_request(prompt, **kwargs), timeout))

    def models(self, *, timeout: Timeout = _UNSET) -> EnsembleInfo:
        try:
            response = self._stub.Models(
                coordinator_pb2.ModelsRequest(), timeout=self._call_timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return _ensemble(response)

    def _responses(
        self, request: coordinator_pb2.GenerateRequest, timeout: Timeout
    ) -> Generator[coordinator_pb2.GenerateResponse, None, None]:
        """Generate's responses, retried while none has arrived."""
        attempts = self._attempts(timeout)
        while True:
            call = self._stub.Generate(request, timeout=attempts.timeout(), metadata=self._metadata)
            received = False
            try:
                for response in call:
                    received = True
                    yield response
                return
            except grpc.RpcError as exc:
                wait = None if received else attempts.wait(exc)
                if wait is None:
                    raise from_rpc_error(exc) from None
            finally:
                call.cancel()
            time.sleep(wait)

    def _collect(self, request: coordinator_pb2.GenerateRequest, timeout: Timeout) -> list[Result]:
        results = _Results()
        for response in self._responses(request, timeout):
            results.add(response)
        return results.in_order()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Settings):
    """asyncio client with the same arguments and methods as `Client`, as coroutines; `stream`
    returns an `AsyncStream` for `async for`."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        retries: int | RetryPolicy = DEFAULT_RETRY,
        load_balancing: str | None = None,
    ) -> None:
        super().__init__(grpc.aio, target, timeout, token, (tls_ca, tls_cert, tls_key), retries, load_balancing)

    async def generate(self, prompt: str | None = None, *, timeout: Timeout = _UNSET, **kwargs: Any) -> Result:
        return (await self._collect(build_request(prompt, **kwargs), timeout))[0]

    async def generate_batch(
        self, conversations: Sequence[Sequence[Message]], *, timeout: Timeout = _UNSET, **kwargs: Any
    ) -> list[Result]:
        return await self._collect(build_request(conversations=conversations, **kwargs), timeout)

    def stream(self, prompt: str | None = None, *, timeout: Timeout = _UNSET, **kwargs: Any) -> AsyncStream:
        return AsyncStream(self._responses(build_request(prompt, **kwargs), timeout))

    async def models(self, *, timeout: Timeout = _UNSET) -> EnsembleInfo:
        try:
            response = await self._stub.Models(
                coordinator_pb2.ModelsRequest(), timeout=self._call_timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return _ensemble(response)

    async def _responses(
        self, request: coordinator_pb2.GenerateRequest, timeout: Timeout
    ) -> AsyncGenerator[coordinator_pb2.GenerateResponse, None]:
        attempts = self._attempts(timeout)
        while True:
            call = self._stub.Generate(request, timeout=attempts.timeout(), metadata=self._metadata)
            received = False
            try:
                async for response in call:
                    received = True
                    yield response
                return
            except grpc.RpcError as exc:
                wait = None if received else attempts.wait(exc)
                if wait is None:
                    raise from_rpc_error(exc) from None
            finally:
                call.cancel()
            await asyncio.sleep(wait)

    async def _collect(self, request: coordinator_pb2.GenerateRequest, timeout: Timeout) -> list[Result]:
        results = _Results()
        async for response in self._responses(request, timeout):
            results.add(response)
        return results.in_order()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
