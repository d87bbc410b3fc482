"""The Chorus client SDK: `Client` (blocking) and `AsyncClient` (asyncio). No torch needed.

import chorus
with chorus.Client("localhost:50051") as client:
    print(client.generate(prompt="12+35=").text)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from chorus.errors import from_rpc_error
from chorus.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

Message = Mapping[str, str]  # {"role": ..., "content": ...}
_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


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
) -> coordinator_pb2.GenerateRequest:
    given = [x is not None for x in (prompt, messages, conversations)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, messages or conversations")
    request = coordinator_pb2.GenerateRequest(
        strategy=strategy or "", request_id=request_id or "", on_worker_loss=on_worker_loss or ""
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


def _credentials(ca: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials | None:
    """TLS to the coordinator: trust `ca` (None with cert/key = the system's roots); cert/key for mutual TLS."""
    if ca is None and cert is None:
        return None
    read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def _channel(module: Any, target: str, creds: grpc.ChannelCredentials | None) -> Any:
    """A channel from grpc or grpc.aio: plaintext, or TLS with creds."""
    if creds is None:
        return module.insecure_channel(target, options=_OPTIONS)
    return module.secure_channel(target, creds, options=_OPTIONS)


def _auth(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


class Client:
    """Blocking client. `timeout` (seconds) is the default deadline of every call; `token` is sent as
    a bearer token; `tls_ca` (and `tls_cert`/`tls_key` for mutual TLS) turn on TLS."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self._channel = _channel(grpc, target, _credentials(tls_ca, tls_cert, tls_key))
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._timeout = timeout
        self._metadata = _auth(token)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Result:
        """Generate for one prompt (or `messages=[...]`); returns the whole result."""
        results = self._collect(build_request(prompt, **kwargs), timeout)
        return results[0]

    def generate_batch(
        self, conversations: Sequence[Sequence[Message]], *, timeout: float | None = None, **kwargs: Any
    ) -> list[Result]:
        """Generate for several conversations concurrently, in one call."""
        return self._collect(build_request(conversations=conversations, **kwargs), timeout)

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield text pieces as they are generated."""
        call = self._stub.Generate(
            build_request(prompt, **kwargs), timeout=timeout or self._timeout, metadata=self._metadata
        )
        try:
            for response in call:
                if response.text:
                    yield response.text
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def models(self, *, timeout: float | None = None) -> EnsembleInfo:
        try:
            response = self._stub.Models(
                coordinator_pb2.ModelsRequest(), timeout=timeout or self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return _ensemble(response)

    def _collect(self, request: coordinator_pb2.GenerateRequest, timeout: float | None) -> list[Result]:
        results = _Results()
        try:
            for response in self._stub.Generate(request, timeout=timeout or self._timeout, metadata=self._metadata):
                results.add(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return results.in_order()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as `Client`, as coroutines / async iterators."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self._channel = _channel(grpc.aio, target, _credentials(tls_ca, tls_cert, tls_key))
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._timeout = timeout
        self._metadata = _auth(token)

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Result:
        return (await self._collect(build_request(prompt, **kwargs), timeout))[0]

    async def generate_batch(
        self, conversations: Sequence[Sequence[Message]], *, timeout: float | None = None, **kwargs: Any
    ) -> list[Result]:
        return await self._collect(build_request(conversations=conversations, **kwargs), timeout)

    async def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[str]:
        call = self._stub.Generate(
            build_request(prompt, **kwargs), timeout=timeout or self._timeout, metadata=self._metadata
        )
        try:
            async for response in call:
                if response.text:
                    yield response.text
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def models(self, *, timeout: float | None = None) -> EnsembleInfo:
        try:
            response = await self._stub.Models(
                coordinator_pb2.ModelsRequest(), timeout=timeout or self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return _ensemble(response)

    async def _collect(self, request: coordinator_pb2.GenerateRequest, timeout: float | None) -> list[Result]:
        results = _Results()
        try:
            async for response in self._stub.Generate(
                request, timeout=timeout or self._timeout, metadata=self._metadata
            ):
                results.add(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return results.in_order()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
