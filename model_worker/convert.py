"""Protobuf <-> domain conversion for the worker: the only place the worker touches protobuf."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from chorus.v1 import common_pb2, worker_pb2
from chorus_common.distribution_wire import write_part
from chorus_common.types import DraftResult, Prompt, SamplingParams, ScoreResult, StepResult
from model_worker.distribution import Format, Part
from model_worker.errors import RequestError

if TYPE_CHECKING:  # the runtime imports the modelling code (server.py)
    from model_worker.runtime import Runtime

_FORMATS = {
    worker_pb2.FULL_FP16: np.dtype(np.float16),
    worker_pb2.FULL_FP32: np.dtype(np.float32),
}
DEFAULT_TOP_K = 20


def prompt_from_proto(prompt: common_pb2.Prompt) -> Prompt:
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        return Prompt(text=prompt.text)
    if kind == "chat":
        messages = tuple((m.role, m.content) for m in prompt.chat.messages)
        return Prompt(messages=messages, apply_chat_template=prompt.apply_chat_template)
    raise RequestError("open.prompt: neither text nor chat given")


def format_from_proto(step: worker_pb2.SessionStep) -> Format:
    if step.format == worker_pb2.TOP_K:
        return Format(top_k=step.top_k or DEFAULT_TOP_K, dtype=np.dtype(np.float32))
    if step.format not in _FORMATS:
        raise RequestError(f"step.format: {step.format} is not TOP_K, FULL_FP16 or FULL_FP32")
    return Format(top_k=0, dtype=_FORMATS[step.format])


def sampling_from_proto(sampling: worker_pb2.Sampling) -> SamplingParams:
    if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        raise RequestError(f"draft.sampling.temperature: {sampling.temperature} must be finite and >= 0")
    if not (math.isfinite(sampling.top_p) and 0 <= sampling.top_p <= 1):
        raise RequestError(f"draft.sampling.top_p: {sampling.top_p} must be in 0..1 (0 = no cut)")
    return SamplingParams(sampling.temperature, sampling.top_p or 1.0, sampling.top_k)


# A response's distributions are written into it in place: a message handed to its parent's constructor is
# copied whole, and a full distribution is a megabyte (chorus_common.distribution_wire.write_part). The
# scalars go through the constructors (a copy of a few bytes).


def draft_to_proto(out: DraftResult) -> worker_pb2.SessionResponse:
    draft = worker_pb2.DraftResult(
        pieces=out.pieces, ended=out.ended, tokens_fed=out.tokens_fed, forward_passes=out.forward_passes
    )
    response = worker_pb2.SessionResponse(draft=draft)
    for parts in out.dists:
        _write_position(parts, response.draft.dists.add())
    return response


def score_to_proto(out: ScoreResult) -> worker_pb2.SessionResponse:
    score = worker_pb2.ScoreResult(tokens_fed=out.tokens_fed, forward_passes=out.forward_passes)
    response = worker_pb2.SessionResponse(score=score)
    for parts in out.positions:
        _write_position(parts, response.score.positions.add())
    return response


def lookup_to_proto(logprobs: list[float]) -> worker_pb2.SessionResponse:
    return worker_pb2.SessionResponse(lookup=worker_pb2.LookupResult(logprobs=logprobs))


def _write_position(parts: list[Part] | None, wire: worker_pb2.PositionDistribution) -> None:
    wire.boundary = parts is not None
    for part in parts or ():
        write_part(part, wire.parts.add())


def step_to_proto(out: StepResult) -> worker_pb2.SessionResponse:
    step = worker_pb2.StepResult(
        tokens_fed=out.tokens_fed,
        forward_passes=out.forward_passes,
        batch_size=out.batch_size,
        queue_ms=out.queue_ms,
        compute_ms=out.compute_ms,
        queue_position=out.queue_position,
    )
    response = worker_pb2.SessionResponse(step=step)
    for part in out.parts:
        write_part(part, response.step.parts.add())
    return response


def info_to_proto(runtime: Runtime) -> worker_pb2.ModelInfo:
    loaded = runtime.loaded
    kv = runtime.engine.report()
    return worker_pb2.ModelInfo(
        name=loaded.name,
        fingerprint=loaded.fingerprint,
        vocab_size=runtime.vocab_size,
        eos_token_ids=runtime.eos_ids,
        context_length=runtime.context_length,
        tokenizer_kind=runtime.tokenizer_kind,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        active_sessions=len(runtime.sessions),
        kv_cache_bytes=kv.held_bytes,
        queued_feeds=runtime.engine.queued,
        max_sessions=runtime.max_sessions,
        kv_block_size=kv.block_size,
        kv_blocks=kv.blocks,
        kv_blocks_free=kv.blocks_free,
        prefix_cache_hit_tokens=kv.prefix_hit_tokens,
    )


def vocabulary_chunks(runtime: Runtime, chunk_size: int) -> list[worker_pb2.VocabularyChunk]:
    size = chunk_size or 8192
    return [
        worker_pb2.VocabularyChunk(
            start_id=start,
            tokens=runtime.tokens[start : start + size],
            special=runtime.special[start : start + size],
        )
        for start in range(0, runtime.vocab_size, size)
    ]
