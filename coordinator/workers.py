"""Talking to workers: info, vocabulary (cached by fingerprint) and session streams.

This module and convert.py are the coordinator's only protobuf code.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from chorus.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from chorus_common.distribution_wire import part_from_proto
from chorus_common.errors import ContextFull
from chorus_common.security import TlsFiles
from chorus_common.serving import LIVENESS, MESSAGE_OPTIONS
from chorus_common.types import DraftResult, Prompt, SamplingParams, ScoreResult, StepResult
from coordinator.types import WorkerInfo
from coordinator.union_vocab import ModelVocab

CHANNEL_OPTIONS = [
    *MESSAGE_OPTIONS,
    # A restarted worker is used again within seconds, not after gRPC's default backoff of up to 2 min.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

# Vocabularies fetched, by model fingerprint: once per process whatever the replica. Bounded: a long-lived
# coordinator whose discovery sees models come and go (new fingerprints) keeps the recent ones only.
VOCAB_CACHE_SIZE = 8


class VocabCache:
    """The `size` vocabularies used last, by fingerprint (least recently used evicted first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, ModelVocab] = OrderedDict()

    def get(self, fingerprint: str) -> ModelVocab | None:
        vocab = self._entries.get(fingerprint)
        if vocab is not None:
            self._entries.move_to_end(fingerprint)
        return vocab

    def put(self, fingerprint: str, vocab: ModelVocab) -> None:
        self._entries[fingerprint] = vocab
        self._entries.move_to_end(fingerprint)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


_vocab_cache = VocabCache(VOCAB_CACHE_SIZE)


@dataclass(frozen=True)
class Transport:
    top_k: int  # 0 = full distributions
    half: bool  # full distributions as float16


class WorkerClient:
    def __init__(self, address: str, tls: TlsFiles | None = None) -> None:
        self.address = address
        if tls is None:
            self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            options = CHANNEL_OPTIONS + tls.channel_options()
            self.channel = grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)
        self.stub = worker_pb2_grpc.ModelWorkerStub(self.channel)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the worker's health check says SERVING (its model is loaded)."""
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"worker {self.address} not serving after {timeout:.0f} s")
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(), timeout=min(remaining, 10.0), wait_for_ready=True
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            await asyncio.sleep(0.2)

    async def alive(self, timeout: float) -> bool:
        """Whether the worker process answers its liveness check within timeout: a busy one does (its event
        loop is free while the model computes), and so does a draining one; a dead or frozen one does not."""
        request = health_pb2.HealthCheckRequest(service=LIVENESS)
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(request, timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def draining(self, timeout: float) -> bool:
        """Whether the worker process answers its liveness check but no longer serves: it is shutting down. For
        a session that ended with gRPC's own status and no mark: ended by a draining worker while its client
        wrote, gRPC's asyncio client can read INTERNAL in place of the status (grpc/grpc#36066)."""
        if not await self.alive(timeout):
            return False
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status != health_pb2.HealthCheckResponse.SERVING

    async def info(self, timeout: float = 30.0) -> WorkerInfo:
        info = await self.stub.Info(worker_pb2.InfoRequest(), timeout=timeout)
        return WorkerInfo(
            name=info.name,
            fingerprint=info.fingerprint,
            vocab_size=info.vocab_size,
            eos_ids=frozenset(info.eos_token_ids),
            context_length=info.context_length,
            tokenizer_kind=info.tokenizer_kind,
            device=info.device,
        )

    async def vocabulary(self, info: WorkerInfo, timeout: float = 300.0) -> ModelVocab:
        cached = _vocab_cache.get(info.fingerprint)
        if cached is not None:
            return cached
        tokens: list[bytes] = []
        special: list[bool] = []
        with tqdm(total=info.vocab_size, desc=f"vocabulary {info.name}", unit="tok", disable=None, leave=False) as bar:
            async for chunk in self.stub.Vocabulary(worker_pb2.VocabularyRequest(), timeout=timeout):
                if chunk.start_id != len(tokens):
                    raise RuntimeError(f"{self.address}: vocabulary chunk out of order at id {chunk.start_id}")
                tokens.extend(chunk.tokens)
                special.extend(chunk.special)
                bar.update(len(chunk.tokens))
        if len(tokens) != info.vocab_size:
            raise RuntimeError(f"{self.address}: vocabulary has {len(tokens)} tokens, info says {info.vocab_size}")
        vocab = ModelVocab(tokens=tokens, special=special, eos_ids=info.eos_ids)
        _vocab_cache.put(info.fingerprint, vocab)
        return vocab

    def session(self, timeout: float | None) -> ModelSession:
        return ModelSession(self.stub.Session(timeout=timeout))

    async def close(self) -> None:
        await self.channel.close()


class ModelSession:
    """One request's session on one worker: a bidirectional stream."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call

    async def open(self, prompt: Prompt, request_id: str) -> int:
        await self._write(worker_pb2.SessionRequest(open=_prompt_to_proto(prompt, request_id)))
        response = await self._read()
        return response.opened.prompt_tokens

    # Every call that moves the text drops `rollback` bytes the worker holds, then appends `append`.

    async def step(self, append: bytes, transport: Transport, rollback: int = 0, partial: bool = False) -> StepResult:
        if transport.top_k:
            step = worker_pb2.SessionStep(append=append, format=worker_pb2.TOP_K, top_k=transport.top_k)
        else:
            fmt = worker_pb2.FULL_FP16 if transport.half else worker_pb2.FULL_FP32
            step = worker_pb2.SessionStep(append=append, format=fmt)
        step.rollback = rollback
        step.partial = partial
        await self._write(worker_pb2.SessionRequest(step=step))
        result = (await self._read()).step
        return StepResult(
            parts=[part_from_proto(p) for p in result.parts],
            tokens_fed=result.tokens_fed,
            forward_passes=result.forward_passes,
            batch_size=result.batch_size,
            queue_ms=result.queue_ms,
            compute_ms=result.compute_ms,
            queue_position=result.queue_position,
        )

    async def draft(
        self,
        append: bytes,
        rollback: int,
        max_tokens: int,
        sampling: SamplingParams,
        seed: int,
        report_top_k: int,
        partial: bool = False,
    ) -> DraftResult:
        params = worker_pb2.Sampling(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=seed
        )
        draft = worker_pb2.SessionDraft(
            append=append,
            rollback=rollback,
            max_tokens=max_tokens,
            sampling=params,
            report_top_k=report_top_k,
            partial=partial,
        )
        await self._write(worker_pb2.SessionRequest(draft=draft))
        result = (await self._read()).draft
        return DraftResult(
            pieces=list(result.pieces),
            ended=result.ended,
            dists=[[part_from_proto(p) for p in d.parts] for d in result.dists],
            tokens_fed=result.tokens_fed,
            forward_passes=result.forward_passes,
        )

    async def score(
        self, append: bytes, rollback: int, pieces: list[bytes], top_k: int, partial: bool = False
    ) -> ScoreResult:
        score = worker_pb2.SessionScore(append=append, rollback=rollback, pieces=pieces, top_k=top_k, partial=partial)
        await self._write(worker_pb2.SessionRequest(score=score))
        result = (await self._read()).score
        return ScoreResult(
            positions=[[part_from_proto(p) for p in d.parts] if d.boundary else None for d in result.positions],
            tokens_fed=result.tokens_fed,
            forward_passes=result.forward_passes,
        )

    async def lookup(self, candidates: list[bytes]) -> np.ndarray:
        await self._write(worker_pb2.SessionRequest(lookup=worker_pb2.SessionLookup(candidates=candidates)))
        return np.array((await self._read()).lookup.logprobs, dtype=np.float64)

    def cancel(self) -> None:
        self._call.cancel()

    async def _write(self, request: worker_pb2.SessionRequest) -> None:
        """Send one message; if the worker already ended the stream, raise its status, with its metadata
        (gRPC may report a write after the end as its own INTERNAL, hiding the worker's answer)."""
        try:
            await self._call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            code = await asyncio.wait_for(self._call.code(), 5.0)
            if code == grpc.StatusCode.OK:
                raise
            details = await self._call.details()
            initial, trailing = await self._call.initial_metadata(), await self._call.trailing_metadata()
            raise grpc.aio.AioRpcError(code, initial, trailing, details) from exc

    async def _read(self) -> worker_pb2.SessionResponse:
        response = await self._call.read()
        if response is grpc.aio.EOF:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "worker closed the session"
            )
        if response.WhichOneof("kind") == "context_full":
            raise ContextFull(response.context_full.details)
        return response


def _prompt_to_proto(prompt: Prompt, request_id: str) -> worker_pb2.SessionOpen:
    if prompt.text is not None:
        p = common_pb2.Prompt(text=prompt.text)
    else:
        chat = common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in prompt.messages])
        p = common_pb2.Prompt(chat=chat, apply_chat_template=prompt.apply_chat_template)
    return worker_pb2.SessionOpen(prompt=p, request_id=request_id)
