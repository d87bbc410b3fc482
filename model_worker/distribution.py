"""Turn output logits into the parts of a next-bytes distribution (see conditioning.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from chorus_common.types import DistributionPart
from model_worker.conditioning import Conditioner, Plan, PrefixIndex


@dataclass(frozen=True)
class Format:
    top_k: int  # 0 = the full distribution
    dtype: np.dtype  # dtype of full distributions on the wire


FULL = Format(0, np.dtype(np.float32))


@dataclass(frozen=True)
class Part(DistributionPart):
    """A distribution part as the worker builds it, knowing where its tokens go."""

    # How many of the plan's last tokens its tokens replace: 0 = they follow the last token; k > 0 = they
    # replace the last k (a healing part: they extend those tokens' bytes and the pending ones).
    replaces: int = 0

    @property
    def after_last(self) -> bool:
        return self.replaces == 0


def build_parts(plan: Plan, rows: dict[int, torch.Tensor], index: PrefixIndex, fmt: Format) -> list[Part]:
    """The next-bytes distribution after the plan's text: for each open level, the tokens that extend its bytes
    (scaled by the probability of the open tokens before them), then the tokens after the last token."""
    n = len(plan)
    parts: list[Part] = []
    scale = 0.0
    for j, prefix in enumerate(plan.levels):
        k = plan.open - j  # this part's tokens replace the last k
        before = torch.log_softmax(rows[n - 1 - k].float(), dim=-1)
        parts += _sparse(before, index.extensions(prefix), len(prefix), scale, fmt.top_k, replaces=k)
        scale += float(before[plan.extra[len(plan.extra) - k]])
    after = torch.log_softmax(rows[n - 1].float(), dim=-1)
    if plan.pending:
        parts += _sparse(after, index.extensions(plan.pending), len(plan.pending), scale, fmt.top_k)
    elif plan.inside:  # a character spelt with tokens up to here: the next one goes on with it
        parts += _sparse(after, index.continuing, 0, scale, fmt.top_k)
    else:
        parts.append(dense_part(after, scale, fmt))
    return parts


def dense_part(logprobs: torch.Tensor, scale: float, fmt: Format) -> Part:
    if fmt.top_k:
        values, ids = torch.topk(logprobs, min(fmt.top_k, logprobs.numel()))
        return Part(0, scale, ids.cpu().numpy().astype(np.uint32), values.cpu().numpy())
    return Part(0, scale, None, logprobs.cpu().numpy().astype(fmt.dtype, copy=False))


def _sparse(
    logprobs: torch.Tensor, ids: np.ndarray, skip: int, scale: float, top_k: int, replaces: int = 0
) -> list[Part]:
    if ids.size == 0:
        return []
    index = torch.from_numpy(ids).to(logprobs.device)
    values = logprobs[index]
    if top_k and ids.size > top_k:
        values, order = torch.topk(values, top_k)
        index = index[order]
    return [Part(skip, scale, index.cpu().numpy().astype(np.uint32), values.cpu().numpy(), replaces)]


def lookup_logprob(
    plan: Plan, rows: dict[int, torch.Tensor], conditioner: Conditioner, eos: frozenset[int], candidate: bytes
) -> float:
    """Log-probability of the longest next-bytes option (a token, or the rest of a healed one) that
    is a prefix of candidate, summed over the tokens that spell it; b"" = end of sequence."""
    n = len(plan)
    options: list[tuple[bytes, float, torch.Tensor]] = []  # (bytes already committed, log scale, logprobs)
    scale = 0.0
    for j, prefix in enumerate(plan.levels):
        k = plan.open - j
        before = torch.log_softmax(rows[n - 1 - k].float(), dim=-1)
        options.append((prefix, scale, before))
        scale += float(before[plan.extra[len(plan.extra) - k]])
    after = torch.log_softmax(rows[n - 1].float(), dim=-1)
    if not (plan.inside and not plan.pending and candidate and not 0x80 <= candidate[0] < 0xC0):
        options.append((plan.pending, scale, after))  # inside a character, only what continues it
    if not candidate:
        ids = sorted(eos)
        ended = ids and not plan.pending and not plan.inside
        return float(torch.logsumexp(after[ids], 0)) + scale if ended else -math.inf
    for length in range(len(candidate), 0, -1):
        spelled = [(s, lp, conditioner.ids_by_bytes.get(prefix + candidate[:length])) for prefix, s, lp in options]
        terms = [s + float(lp[i]) for s, lp, ids in spelled if ids for i in ids]
        if terms:
            return float(np.logaddexp.reduce(terms))
    return -math.inf
