"""How a model's layers attend, read from its config: the shape of their keys and values, and their groups
(full-attention layers, and sliding-window layers that need only their window)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FULL = "full_attention"
SLIDING = "sliding_attention"


class UnsupportedModel(ValueError):
    """The model's attention cannot be served from this KV cache (say, chunked attention)."""


@dataclass(frozen=True)
class KVGroup:
    kind: str  # FULL or SLIDING
    layers: tuple[int, ...]
    window: int | None  # SLIDING: a query at p sees keys in (p - window, p]
    bytes_per_token: int  # keys and values of one position over the group's layers


@dataclass(frozen=True)
class KVLayout:
    groups: tuple[KVGroup, ...]
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @staticmethod
    def of(config: Any, dtype: torch.dtype) -> KVLayout:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(config, "attention_chunk_size", None):
            raise UnsupportedModel("chunked attention (attention_chunk_size) is not supported")
        try:
            layers = int(config.num_hidden_layers)
            heads = int(config.num_attention_heads)
            hidden = int(config.hidden_size)
        except (AttributeError, TypeError) as exc:
            raise UnsupportedModel(f"cannot size the KV cache from the model's config ({exc})") from exc
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        window = getattr(config, "sliding_window", None)
        types = tuple(getattr(config, "layer_types", None) or ((SLIDING if window else FULL),) * layers)
        unknown = set(types) - {FULL, SLIDING}
        if unknown:
            raise UnsupportedModel(f"layer types {sorted(unknown)} are not supported (only {FULL}, {SLIDING})")
        if SLIDING in types and not window:
            raise UnsupportedModel("sliding-window layers without a sliding_window in the config")
        per_layer = _layer_bytes_per_token(kv_heads, head_dim, dtype)
        groups = []
        for kind in (FULL, SLIDING):
            members = tuple(i for i, t in enumerate(types) if t == kind)
            if members:
                groups.append(
                    KVGroup(kind, members, int(window) if kind == SLIDING else None, per_layer * len(members))
                )
        return KVLayout(tuple(groups), kv_heads, head_dim, dtype)

    @property
    def layer_bytes_per_token(self) -> int:
        """Keys and values of one position in one layer."""
        return _layer_bytes_per_token(self.kv_heads, self.head_dim, self.dtype)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one position over every layer (what a session pays per token of its context
        when its text is shorter than the window)."""
        return sum(g.bytes_per_token for g in self.groups)

    def group_of(self) -> dict[int, int]:
        return {layer: g for g, group in enumerate(self.groups) for layer in group.layers}

    def pool_blocks(self, budget: int, sessions: int, context: int, block_size: int, margin: int) -> list[int]:
        """Blocks per group for a budget of `budget` bytes (0: room for `sessions` full contexts). A sliding
        group gets its window (plus margin) for each of `sessions` sessions; full groups share the rest, up
        to `sessions` full contexts."""

        def blocks(tokens: int) -> int:
            return -(-tokens // block_size)

        sliding = [g for g in self.groups if g.window is not None]
        per_session = {id(g): min(blocks(context), blocks(g.window + margin) + 1) for g in sliding}  # type: ignore[operator]
        window_bytes = sum(per_session[id(g)] * block_size * g.bytes_per_token for g in sliding)
        full_bytes = sum(g.bytes_per_token for g in self.groups if g.window is None)
        most = blocks(context) * sessions
        if not budget:
            return [per_session[id(g)] * sessions if g.window is not None else most for g in self.groups]
        if budget < window_bytes + blocks(context) * block_size * full_bytes:
            need = (window_bytes + blocks(context) * block_size * full_bytes) / 2**20
            raise ValueError(
                f"--kv-budget-mib: {budget / 2**20:.1f} MiB do not hold one session of {context} tokens "
                f"({need:.1f} MiB); raise it or lower --max-model-len"
            )
        # Sessions whose windows fit next to at least one full context; the full groups take what is left.
        fit = max(1, min(sessions, (budget - blocks(context) * block_size * full_bytes) // max(window_bytes, 1)))
        out = []
        for g in self.groups:
            if g.window is not None:
                out.append(per_session[id(g)] * fit)
            else:
                out.append(min(most, (budget - fit * window_bytes) // (block_size * full_bytes)))
        return out


def _layer_bytes_per_token(kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * kv_heads * head_dim * dtype.itemsize
