"""Turn output logits into the parts of a next-bytes distribution (see conditioning.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from chorus_common.types import DistributionPart
from model_worker.conditioning import Branch, Conditioner, Plan, PrefixIndex, branch_rows


@dataclass(frozen=True)
class Format:
    top_k: int  # 0 = the full distribution
    dtype: np.dtype  # dtype of full distributions on the wire


FULL = Format(0, np.dtype(np.float32))


@dataclass(frozen=True)
class Part(DistributionPart):
    """A distribution part as the worker builds it, knowing where its tokens go."""

    # How many of the plan's last tokens its tokens replace: 0 = they follow the last token; k > 0 = they
    # replace the last k (a healing part: they extend those tokens' bytes and the pending ones); -1 = they
    # follow the alternative spelling's tokens, which replace the last one (Plan.alt).
    replaces: int = 0


def build_parts(
    plan: Plan,
    rows: dict[int, torch.Tensor],
    index: PrefixIndex,
    fmt: Format,
    branches: Mapping[Branch, torch.Tensor] | None = None,
) -> list[Part]:
    """The next-bytes distribution after the plan's text: for each open level, the tokens that extend its bytes
    (scaled by the probability of the open tokens before them), then the tokens after the alternative
    spelling's tokens where there is one (its branch rows), then the tokens after the last token."""
    n = len(plan)
    parts: list[Part] = []
    scale = 0.0
    alt = _alt_rows(plan, branches)
    for j, prefix in enumerate(plan.levels):
        k = plan.open - j  # this part's tokens replace the last k
        before = torch.log_softmax(rows[n - 1 - k].float(), dim=-1)
        parts += _sparse(before, index.extensions(prefix), len(prefix), scale, fmt.top_k, replaces=k)
        if k == 1 and alt is not None:  # the run's other spelling, then what follows it
            weight, after_alt, rest = _alt_weight(plan, before, alt, scale)
            if rest:
                parts += _sparse(after_alt, index.extensions(rest), len(rest), weight, fmt.top_k, replaces=-1)
            else:
                parts.append(dense_part(after_alt, weight, fmt, replaces=-1))
        scale += float(before[plan.extra[len(plan.extra) - k]])
    after = torch.log_softmax(rows[n - 1].float(), dim=-1)
    if plan.pending:
        parts += _sparse(after, index.extensions(plan.pending), len(plan.pending), scale, fmt.top_k)
    elif plan.inside:  # a character spelt with tokens up to here: the next one goes on with it
        parts += _sparse(after, index.continuing, 0, scale, fmt.top_k)
    else:
        parts.append(dense_part(after, scale, fmt))
    return parts


def _alt_rows(plan: Plan, branches: Mapping[Branch, torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Log-probabilities after each token of the alternative spelling, if the plan has one and its branch
    rows were computed."""
    if plan.branch is None or not branches:
        return None
    keys = branch_rows(plan.branch)
    if not all(key in branches for key in keys):
        return None
    return [torch.log_softmax(branches[key].float(), dim=-1) for key in keys]


def _alt_weight(
    plan: Plan, before: torch.Tensor, alt: list[torch.Tensor], scale: float
) -> tuple[float, torch.Tensor, bytes]:
    """The log-probability of the alternative spelling's tokens (from the row before the last token, then
    each branch row), added to `scale`; the log-probabilities after them; the bytes the next token starts with."""
    assert plan.alt is not None
    tokens = plan.alt.tokens
    weight = scale + float(before[tokens[0]])
    for row, token in zip(alt, tokens[1:], strict=False):
        weight += float(row[token])
    return weight, alt[-1], plan.alt.rest


def dense_part(logprobs: torch.Tensor, scale: float, fmt: Format, replaces: int = 0) -> Part:
    if fmt.top_k:
        values, ids = torch.topk(logprobs, min(fmt.top_k, logprobs.numel()))
        return Part(0, scale, ids.cpu().numpy().astype(np.uint32), values.cpu().numpy(), replaces)
    return Part(0, scale, None, logprobs.cpu().numpy().astype(fmt.dtype, copy=False), replaces)


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
    plan: Plan,
    rows: dict[int, torch.Tensor],
    conditioner: Conditioner,
    eos: frozenset[int],
    candidate: bytes,
    branches: Mapping[Branch, torch.Tensor] | None = None,
) -> float:
    """Log-probability of the longest next-bytes option (a token, or the rest of a healed one) that
    is a prefix of candidate, summed over the tokens that spell it; b"" = end of sequence."""
    n = len(plan)
    options: list[tuple[bytes, float, torch.Tensor]] = []  # (bytes already committed, log scale, logprobs)
    scale = 0.0
    alt = _alt_rows(plan, branches)
    ends: list[tuple[float, torch.Tensor]] = []  # (log scale, logprobs) of the rows after which the text may end
    for j, prefix in enumerate(plan.levels):
        k = plan.open - j
        before = torch.log_softmax(rows[n - 1 - k].float(), dim=-1)
        options.append((prefix, scale, before))
        if k == 1 and alt is not None:
            weight, after_alt, rest = _alt_weight(plan, before, alt, scale)
            options.append((rest, weight, after_alt))
            if not rest:
                ends.append((weight, after_alt))
        scale += float(before[plan.extra[len(plan.extra) - k]])
    after = torch.log_softmax(rows[n - 1].float(), dim=-1)
    if not (plan.inside and not plan.pending and candidate and not 0x80 <= candidate[0] < 0xC0):
        options.append((plan.pending, scale, after))  # inside a character, only what continues it
    if not candidate:
        ids = sorted(eos)
        if not ids or plan.pending or plan.inside:
            return -math.inf
        terms = [float(torch.logsumexp(lp[ids], 0)) + s for s, lp in [*ends, (scale, after)]]
        return float(np.logaddexp.reduce(terms))
    for length in range(len(candidate), 0, -1):
        spelled = [(s, lp, conditioner.ids_of(prefix + candidate[:length])) for prefix, s, lp in options]
        terms = [s + float(lp[i]) for s, lp, ids in spelled if ids for i in ids]
        if terms:
            return float(np.logaddexp.reduce(terms))
    return -math.inf
