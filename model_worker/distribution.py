"""Turn output logits into the parts of a next-bytes distribution (see conditioning.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model_worker.conditioning import Plan, PrefixIndex


@dataclass(frozen=True)
class Format:
    top_k: int  # 0 = the full distribution
    dtype: np.dtype  # dtype of full distributions on the wire


@dataclass(frozen=True)
class Part:
    """Token t stands for bytes(t)[skip_bytes:] with probability exp(log_scale + logprob)."""

    skip_bytes: int
    log_scale: float
    ids: np.ndarray | None  # None = dense over the whole vocabulary
    logprobs: np.ndarray
    rest_mass: float


def build_parts(plan: Plan, rows: dict[int, torch.Tensor], index: PrefixIndex, fmt: Format) -> list[Part]:
    n = len(plan.ids)
    after = torch.log_softmax(rows[n - 1].float(), dim=-1)
    parts: list[Part] = []
    scale = 0.0
    if plan.heal_prefix is not None:
        before = torch.log_softmax(rows[n - 2].float(), dim=-1)
        prefix = plan.heal_prefix
        parts += _sparse(before, index.extensions(prefix), len(prefix), 0.0, fmt.top_k)
        scale = float(before[plan.ids[-1]])
    if plan.pending:
        parts += _sparse(after, index.extensions(plan.pending), len(plan.pending), scale, fmt.top_k)
    else:
        parts.append(_dense(after, scale, fmt))
    return parts


def _dense(logprobs: torch.Tensor, scale: float, fmt: Format) -> Part:
    if fmt.top_k:
        values, ids = torch.topk(logprobs, min(fmt.top_k, logprobs.numel()))
        rest = max(0.0, 1.0 - float(values.exp().sum()))
        return Part(0, scale, ids.cpu().numpy().astype(np.uint32), values.cpu().numpy(), rest)
    return Part(0, scale, None, logprobs.cpu().numpy().astype(fmt.dtype, copy=False), 0.0)


def _sparse(logprobs: torch.Tensor, ids: np.ndarray, skip: int, scale: float, top_k: int) -> list[Part]:
    if ids.size == 0:
        return []
    index = torch.from_numpy(ids).to(logprobs.device)
    values = logprobs[index]
    rest = 0.0
    if top_k and ids.size > top_k:
        total = float(values.exp().sum())
        values, order = torch.topk(values, top_k)
        index = index[order]
        rest = max(0.0, total - float(values.exp().sum()))
    return [Part(skip, scale, index.cpu().numpy().astype(np.uint32), values.cpu().numpy(), rest)]
