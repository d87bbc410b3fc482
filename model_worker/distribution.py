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

    # Its tokens follow the plan's last token; False = they replace it (the healing part).
    after_last: bool = True


def build_parts(plan: Plan, rows: dict[int, torch.Tensor], index: PrefixIndex, fmt: Format) -> list[Part]:
    n = len(plan)
    after = torch.log_softmax(rows[n - 1].float(), dim=-1)
    parts: list[Part] = []
    scale = 0.0
    if plan.heal_prefix is not None:
        before = torch.log_softmax(rows[n - 2].float(), dim=-1)
        prefix = plan.heal_prefix
        parts += _sparse(before, index.extensions(prefix), len(prefix), 0.0, fmt.top_k, after_last=False)
        scale = float(before[plan.last])
    if plan.pending:
        parts += _sparse(after, index.extensions(plan.pending), len(plan.pending), scale, fmt.top_k)
    else:
        parts.append(dense_part(after, scale, fmt))
    return parts


def dense_part(logprobs: torch.Tensor, scale: float, fmt: Format) -> Part:
    if fmt.top_k:
        values, ids = torch.topk(logprobs, min(fmt.top_k, logprobs.numel()))
        return Part(0, scale, ids.cpu().numpy().astype(np.uint32), values.cpu().numpy())
    return Part(0, scale, None, logprobs.cpu().numpy().astype(fmt.dtype, copy=False))


def _sparse(
    logprobs: torch.Tensor, ids: np.ndarray, skip: int, scale: float, top_k: int, after_last: bool = True
) -> list[Part]:
    if ids.size == 0:
        return []
    index = torch.from_numpy(ids).to(logprobs.device)
    values = logprobs[index]
    if top_k and ids.size > top_k:
        values, order = torch.topk(values, top_k)
        index = index[order]
    return [Part(skip, scale, index.cpu().numpy().astype(np.uint32), values.cpu().numpy(), after_last)]


def lookup_logprob(
    plan: Plan, rows: dict[int, torch.Tensor], conditioner: Conditioner, eos: frozenset[int], candidate: bytes
) -> float:
    """Log-probability of the longest next-bytes option (a token, or the rest of a healed one) that
    is a prefix of candidate, summed over the tokens that spell it; b"" = end of sequence."""
    n = len(plan)
    after = torch.log_softmax(rows[n - 1].float(), dim=-1)
    options: list[tuple[bytes, float, torch.Tensor]] = []  # (bytes already committed, log scale, logprobs)
    scale = 0.0
    if plan.heal_prefix is not None:
        before = torch.log_softmax(rows[n - 2].float(), dim=-1)
        options.append((plan.heal_prefix, 0.0, before))
        scale = float(before[plan.last])
    options.append((plan.pending, scale, after))
    if not candidate:
        ids = sorted(eos)
        return float(torch.logsumexp(after[ids], 0)) + scale if ids and not plan.pending else -math.inf
    for length in range(len(candidate), 0, -1):
        spelled = [(s, lp, conditioner.ids_by_bytes.get(prefix + candidate[:length])) for prefix, s, lp in options]
        terms = [s + float(lp[i]) for s, lp, ids in spelled if ids for i in ids]
        if terms:
            return float(np.logaddexp.reduce(terms))
    return -math.inf
