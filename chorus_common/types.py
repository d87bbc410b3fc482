"""Domain types both services speak: what a prompt is, how to sample, a part of a distribution.
Protobuf stays at each service's edge (`coordinator/convert.py`, `model_worker/convert.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prompt:
    text: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    apply_chat_template: bool = False


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit


@dataclass(frozen=True)
class DistributionPart:
    """A part of one model's next-bytes distribution: token t stands for bytes(t)[skip_bytes:] with
    probability exp(log_scale + logprobs[i]) where ids[i] == t."""

    skip_bytes: int
    log_scale: float
    ids: np.ndarray | None  # None = dense over the whole vocabulary
    logprobs: np.ndarray


@dataclass(frozen=True)
class StepResult:
    """A model's next-bytes distribution after a step, and what computing it cost."""

    parts: list[DistributionPart]
    tokens_fed: int  # tokens run through the model for this step
    forward_passes: int
    batch_size: int = 0  # sessions in the forward pass it rode in
    queue_ms: float = 0.0  # from arrival at the worker to its first forward pass
    compute_ms: float = 0.0
    queue_position: int = 0  # feeds waiting ahead of it when it arrived


@dataclass(frozen=True)
class DraftResult:
    """Tokens a worker drew itself: their bytes, and (when asked) each draw's distribution."""

    pieces: list[bytes]  # one per drawn token
    ended: bool  # an end-of-sequence token was drawn after the pieces
    dists: list[list[DistributionPart]]
    tokens_fed: int
    forward_passes: int


@dataclass(frozen=True)
class ScoreResult:
    """A model's distributions before each scored piece and after the last (None: no token boundary)."""

    positions: list[list[DistributionPart] | None]
    tokens_fed: int
    forward_passes: int
