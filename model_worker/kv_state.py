"""One session's KV cache: a slot of the storage, the tokens cached in it, and the output rows kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVState:
    slot: int  # the session's slot in the worker's SlotStorage
    ids: list[int] = field(default_factory=list)  # tokens whose keys and values are in the slot, in order
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> output logits after it

    def truncate(self, n: int) -> None:
        """Forget every token from position n on: a length change, nothing is moved."""
        if n < len(self.ids):
            del self.ids[n:]
        self.rows = {p: r for p, r in self.rows.items() if p < n}

    def keep_rows(self, positions: set[int]) -> None:
        self.rows = {p: r for p, r in self.rows.items() if p in positions}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
