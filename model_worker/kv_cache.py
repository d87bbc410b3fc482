"""KV caches written in place: preallocated slots, one per session, and the per-pass view the model sees.

Every layer's keys and values live in one tensor of shape [slots, kv_heads, slot_tokens, head_dim]. A
session owns a slot for its lifetime; its cache is the first `length` positions of that slot, so rolling
back or truncating is a length change. A forward pass over sessions whose slots lie in [lo, hi) writes the
new tokens' keys and values straight into their positions and hands attention a *view* of
storage[lo:hi, :, :kv_len] — no session's cache is copied, stacked or padded (the old batcher re-stacked
every cache on every step). Rows of the view that no session of the pass uses are dummies: they attend
to one position and their outputs are dropped. Masks are built here, per session length, for full and
sliding-window layers, in the form the model's own forward accepts (one 4-D mask, or a mapping by layer
type for hybrid models such as Gemma 3).
"""

from __future__ import annotations

import heapq
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

FULL = "full_attention"
SLIDING = "sliding_attention"


class UnsupportedModel(ValueError):
    """The model's attention pattern cannot be served from slots (say, chunked attention)."""


@dataclass(frozen=True)
class AttentionPattern:
    """How a model's layers attend, and how its forward takes a prepared mask."""

    layer_types: tuple[str, ...]  # per layer: FULL or SLIDING
    sliding_window: int | None
    mask_by_type: bool  # the forward takes {layer type: mask}; else one mask for every layer
    boolean: bool  # SDPA takes a boolean mask; eager attention adds a float one

    @staticmethod
    def of(model: Any) -> AttentionPattern:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layers = int(config.num_hidden_layers)
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if getattr(config, "attention_chunk_size", None):
            raise UnsupportedModel("chunked attention (attention_chunk_size) is not supported")
        if types:
            types = tuple(types)
            unknown = set(types) - {FULL, SLIDING}
            if unknown:
                raise UnsupportedModel(f"layer types {sorted(unknown)} are not supported (only {FULL}, {SLIDING})")
        else:
            types = (SLIDING if window else FULL,) * layers
        body = getattr(model, getattr(model, "base_model_prefix", "model"), model)
        takes_mapping = "attention_mask, dict)" in inspect.getsource(type(body).forward)
        if not takes_mapping and len(set(types)) > 1:
            raise UnsupportedModel("mixed layer types in a model whose forward takes a single mask")
        if SLIDING in types and not window:
            raise UnsupportedModel("sliding-window layers without a sliding_window in the config")
        boolean = getattr(config, "_attn_implementation", "sdpa") != "eager"
        return AttentionPattern(types, int(window) if window else None, takes_mapping, boolean)


def uninitialized(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class SlotStorage:
    """Keys and values of every layer, preallocated by slot; slots are handed out lowest first, so the
    sessions of a pass sit close together and the view over them has few dummy rows."""

    def __init__(self, slots: int, slot_tokens: int, device: torch.device) -> None:
        if slots < 1 or slot_tokens < 1:
            raise ValueError(f"KV storage needs at least one slot of one token (got {slots} x {slot_tokens})")
        self.slots = slots
        self.slot_tokens = slot_tokens
        self.device = device
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self._free = list(range(slots))
        heapq.heapify(self._free)
        # Slots ever handed out: zeroed once in every layer. A pass reads a slot's cells past its
        # session's length too (masked); uninitialised memory there may hold NaN, and a masked NaN
        # still poisons the row (NaN + mask is NaN; 0 x NaN is NaN). Stale cells of an earlier session
        # are finite, so a reused slot needs no zeroing.
        self._used: set[int] = set()

    def acquire(self) -> int | None:
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        if slot not in self._used:
            self._used.add(slot)
            with torch.inference_mode():  # the layers were allocated in a forward pass
                for t in (*self.keys, *self.values):
                    if t is not None:
                        t[slot].zero_()
        return slot

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    @property
    def free(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def layer(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The storage of one layer, allocated at its first use with the shape of its keys."""
        while len(self.keys) <= index:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[index] is None:
            shape = (self.slots, like.shape[1], self.slot_tokens, like.shape[3])
            # Uninitialised, not zeros: slots never handed out cost no memory on CPU; those in use are zeroed.
            self.keys[index] = uninitialized(shape, like.dtype, self.device)
            self.values[index] = uninitialized(shape, like.dtype, self.device)
            for t in (self.keys[index], self.values[index]):
                for slot in self._used:
                    t[slot].zero_()
        return self.keys[index], self.values[index]  # type: ignore[return-value]


@dataclass(frozen=True)
class PassLayout:
    """Where a pass writes and what it reads: the view [lo, hi) x [0, kv_len) and the written cells."""

    lo: int
    hi: int
    kv_len: int
    write_slot: torch.Tensor  # slot of each new token
    write_pos: torch.Tensor  # its position in the slot
    src_row: torch.Tensor  # its row in the pass's input
    src_col: torch.Tensor  # its column in the pass's input


class _SlotLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, storage: SlotStorage, index: int, layout: PassLayout) -> None:
        super().__init__()
        self._storage, self._index, self._layout = storage, index, layout
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._storage.layer(self._index, key_states)
        at = self._layout
        keys[at.write_slot, :, at.write_pos] = key_states[at.src_row, :, at.src_col]
        values[at.write_slot, :, at.write_pos] = value_states[at.src_row, :, at.src_col]
        return keys[at.lo : at.hi, :, : at.kv_len], values[at.lo : at.hi, :, : at.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._layout.kv_len, 0

    def get_seq_length(self) -> int:
        return self._layout.kv_len

    def get_max_length(self) -> int:
        return self._storage.slot_tokens


class PassCache(Cache):
    """The cache object one forward pass sees: every layer writes into and reads from the slot storage."""

    def __init__(self, storage: SlotStorage, layers: int, layout: PassLayout) -> None:
        super().__init__(layers=[_SlotLayer(storage, i, layout) for i in range(layers)])


def build_masks(pattern: AttentionPattern, q_pos: torch.Tensor, kv_len: int, dtype: torch.dtype) -> Any:
    """Masks [rows, 1, queries, kv_len] from each query's absolute position (0 for padding and dummies,
    which then attend to position 0 only): a query at p sees positions <= p, and within the window on
    sliding layers."""
    kv = torch.arange(kv_len, device=q_pos.device)[None, None, :]
    seen = kv <= q_pos[:, :, None]
    masks = {FULL: seen}
    if pattern.sliding_window and SLIDING in pattern.layer_types:
        masks[SLIDING] = seen & (kv > q_pos[:, :, None] - pattern.sliding_window)
    if not pattern.boolean:
        low = torch.finfo(dtype).min
        masks = {k: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, low) for k, m in masks.items()}
    masks = {k: m[:, None] for k, m in masks.items()}
    if pattern.mask_by_type:
        return {t: masks[t] for t in set(pattern.layer_types)}
    return masks[pattern.layer_types[0]]
