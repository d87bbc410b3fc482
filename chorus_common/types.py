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
