"""Domain objects the coordinator works with (protobuf stays in convert.py and workers.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from chorus_common.types import Prompt, SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Prompt
    max_new_tokens: int
    strategy: str
    sampling: SamplingParams
    seed: int | None = None
    stop: tuple[str, ...] = ()
    threshold: float = 1.0
    request_id: str = ""
    on_worker_loss: str = "fail"  # or "degrade"
    weights: tuple[float, ...] = ()  # per model, normalised; empty = the configured ones
    step_timeout: float = 1.0
    first_step_timeout: float = 60.0
    replica_wait: float = 5.0  # seconds to wait for a replica to join when the request's one refused it
    model: str | None = None  # a member's name: that member alone; None = the whole ensemble
    # Report each token's log-probability and this many top alternatives (0-20); None = none (no cost).
    logprobs: int | None = None


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    fingerprint: str
    vocab_size: int
    eos_ids: frozenset[int]
    context_length: int
    tokenizer_kind: str
    device: str


@dataclass
class ModelUsage:
    name: str
    prompt_tokens: int = 0
    forward_passes: int = 0
    tokens_fed: int = 0


@dataclass
class Usage:
    completion_tokens: int = 0
    steps: int = 0
    steps_ensembled: int = 0
    models: list[ModelUsage] = field(default_factory=list)
    elapsed_ms: float = 0.0
    lost_models: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its bytes and log-probability under the distribution it was drawn from, and
    that distribution's most likely entries (bytes None = end of sequence)."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes | None, float], ...] = ()


@dataclass(frozen=True)
class TextPiece:
    text: str
    # With request.logprobs: the tokens committed since the previous piece (whose text this piece
    # releases; a piece may be empty to carry the last ones).
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" or "length"
    text: str
    usage: Usage
    request_id: str = ""
