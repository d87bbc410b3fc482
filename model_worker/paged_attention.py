"""Attention over the paged KV storage, plugged into transformers' attention interface.

A pass packs the new tokens of several sessions into one row ([1, T]: decodes and prefill chunks side
by side, no padding). Each layer's keys and values for those tokens are written into the sessions' blocks
(PassCache.update); then `paged_attention` (registered as the attention implementation "chorus_paged")
attends each session's queries to its own positions:
- a session whose keys are a few runs of adjacent blocks reads them as strided views (no copy): scores
  per run, one softmax over them all, weighted sums per run;
- decodes (on a CPU those with short contexts; on a GPU all) are attended together: their blocks are
  gathered into one padded batch (a copy, cheap there and free of per-session overhead). The static form
  (model_runner.StaticDecoder: short feeds of up to 8 tokens a session) uses only this form, with fixed
  shapes that CUDA graphs can capture.
Masks are built here from positions (causal, and the window on sliding layers); a pass hands the model
NO_MASK so that transformers builds none. Outside a pass (transformers' own generate on the same model),
the implementation is plain SDPA with transformers' masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "chorus_paged"
# Device types on which gathered decodes are attended by torch's fused SDPA (no float32 score tensors, a few
# kernels instead of ten per layer): CUDA. On a CPU, the explicit products below, whose rounding the CPU
# tests pin to transformers' own.
FUSED_ON: tuple[str, ...] = ("cuda",)
# Passed as the attention mask of a pass: transformers returns a prepared 4-D mask as it is, so it builds
# none (paged_attention builds its own from positions).
NO_MASK = torch.zeros(1, 1, 0, 0, dtype=torch.bool)


@dataclass
class SeqAttention:
    """One session's queries in a pass, and where its keys are, per KV group."""

    q_start: int  # its first token in the packed row
    q_len: int
    runs: list[list[tuple[int, int]]]  # per group: (first position in the storage, length) in key order
    masks: list[torch.Tensor | None]  # per group: [q_len, keys] visible, or None (every key seen)
    # The last `branches` queries are branch tokens (model_runner.prepare): their own keys and values are
    # read from the pass's new ones, as extra keys after the stored ones (the masks say who sees them).
    branches: int = 0


@dataclass
class GatheredDecodes:
    """B sessions' queries, N each, attended as one padded batch over their gathered blocks (M per session)."""

    rows: torch.Tensor  # [B * N] their tokens in the packed row, session by session
    positions: list[torch.Tensor]  # per group [B * M * block_size]: storage positions of their blocks
    bias: list[torch.Tensor]  # per group [B, N, M * block_size]: 0 where visible, -inf elsewhere


@dataclass
class PassPlan:
    block_size: int
    group_of: dict[int, int]  # layer -> group
    keys: dict[int, torch.Tensor]  # layer -> [kv_heads, positions, head_dim]
    values: dict[int, torch.Tensor]
    write: list[torch.Tensor]  # per group: storage position of each new token [T]
    seqs: list[SeqAttention]  # attended one by one
    gathered: GatheredDecodes | None = None


class _PagedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, plan: PassPlan, layer: int) -> None:
        super().__init__()
        self._plan, self._layer = plan, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan, layer = self._plan, self._layer
        where = plan.write[plan.group_of[layer]]
        plan.keys[layer].index_copy_(1, where, key_states[0])
        plan.values[layer].index_copy_(1, where, value_states[0])
        return key_states, value_states  # paged_attention reads the storage

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


class PassCache(Cache):
    """The cache one pass's model sees: every layer writes its new keys and values into the blocks."""

    def __init__(self, plan: PassPlan, layers: int) -> None:
        super().__init__(layers=[_PagedLayer(plan, i) for i in range(layers)])


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    chorus_pass: PassPlan | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, T, head_dim] -> [1, T, heads, head_dim], each token attending its own session."""
    plan = chorus_pass
    if plan is None:  # the model run outside a pass (say, transformers' own generate): plain SDPA
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kwargs
        )
    layer = module.layer_idx
    g = plan.group_of[layer]
    keys, values = plan.keys[layer], plan.values[layer]
    heads, tokens, dim = query.shape[1], query.shape[2], query.shape[3]
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    out = query.new_empty(1, tokens, heads, values.shape[2])
    plain = not softcap and query.dtype == keys.dtype == values.dtype == torch.float32
    for s in plan.seqs:
        n = s.q_len
        runs = s.runs[g]
        if plain and n == 1 and len(runs) == 1 and not s.branches and s.masks[g] is None:
            # A float32 decode over one run of blocks (a CPU's decodes past GATHER_UP_TO): the products below
            # in three ops instead of a dozen, bitwise equal (tests/test_paged_attention.py); at these sizes
            # a session's attention is mostly per-op overhead, paid per session and layer.
            a, m = runs[0]
            q = query[0, :, s.q_start].view(kv_heads, group, dim)
            scores = torch.bmm(q, keys[:, a : a + m].transpose(1, 2)).mul_(scale)
            out[0, s.q_start] = torch.bmm(torch.softmax(scores, -1), values[:, a : a + m]).view(heads, -1)
            continue
        q = query[0, :, s.q_start : s.q_start + n].reshape(kv_heads, group * n, dim)
        scores = (
            torch.cat([q @ keys[:, a : a + m].transpose(1, 2) for a, m in runs], -1)
            if len(runs) > 1
            else (q @ keys[:, runs[0][0] : runs[0][0] + runs[0][1]].transpose(1, 2))
        )
        if s.branches:
            own = slice(s.q_start + n - s.branches, s.q_start + n)
            scores = torch.cat([scores, q @ key[0, :, own].transpose(1, 2)], -1)
        probs = _softmax(scores, scale, softcap, s.masks[g], (kv_heads, group, n)).to(values.dtype)
        o = None
        offset = 0
        for a, m in runs:
            part = probs[..., offset : offset + m] @ values[:, a : a + m]
            o = part if o is None else o + part
            offset += m
        assert o is not None
        if s.branches:
            o = o + probs[..., offset:] @ value[0, :, own].to(values.dtype)
        out[0, s.q_start : s.q_start + n] = o.view(heads, n, -1).transpose(0, 1)
    if plan.gathered is not None:
        gd = plan.gathered
        out[0].index_copy_(
            0, gd.rows, _gathered(query[0, :, gd.rows], keys, values, gd.positions[g], gd.bias[g], scale, softcap)
        )
    return out, None


def _softmax(
    scores: torch.Tensor, scale: float, softcap: float | None, mask: torch.Tensor | None, shape: tuple[int, int, int]
) -> torch.Tensor:
    scores = scores.float() * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        kv_heads, group, n = shape
        scores = scores.view(kv_heads, group, n, -1).masked_fill(~mask, float("-inf")).view(kv_heads, group * n, -1)
    return torch.softmax(scores, -1)


def _gathered(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """The queries of B sessions, N each (q [heads, B * N, dim], session by session), against their gathered
    blocks (bias [B, N, L]): [B * N, heads, dim]. Fixed shapes for fixed B, N, M. Positions past a session's
    length are masked; the blocks hold zeros there (KVManager zeroes the blocks it hands out), so no garbage
    reaches a product (0 x NaN would be NaN)."""
    heads, rows, dim = q.shape
    batch, n, _ = bias.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    k = keys.index_select(1, positions).view(kv_heads, batch, -1, dim)  # [kv_heads, B, L, dim]
    v = values.index_select(1, positions).view(kv_heads, batch, -1, values.shape[2])
    # Each session's N * group queries per KV head, token-major: [kv_heads, B, N * group, dim].
    qg = q.view(kv_heads, group, batch, n, dim).permute(0, 2, 3, 1, 4).reshape(kv_heads, batch, n * group, dim)
    mask = bias[:, :, None, :].expand(batch, n, group, bias.shape[2]).reshape(batch, n * group, -1)
    if q.device.type in FUSED_ON and not softcap:
        # One fused kernel: each session's queries per KV head as a query sequence over its L keys.
        o = torch.nn.functional.scaled_dot_product_attention(
            qg.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask.to(q.dtype)[:, None], scale=scale
        ).transpose(0, 1)
    else:
        scores = (qg @ k.transpose(2, 3)).float() * scale  # [kv_heads, B, N * group, L]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores + mask[None], -1).to(v.dtype)
        o = probs @ v  # [kv_heads, B, N * group, dim]
    return o.reshape(kv_heads, batch, n, group, -1).permute(1, 2, 0, 3, 4).reshape(rows, heads, -1)


AttentionInterface.register(NAME, paged_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # for runs outside a pass
