"""One session's KV cache, kept between steps and rolled back only where tokens change."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Output rows kept per session between steps: a step needs at most the last two (token healing).
# A scoring pass asks for more; they are kept until the next pass.
ROWS_KEPT = 2


@dataclass
class KVState:
    ids: list[int] = field(default_factory=list)  # tokens whose keys and values are cached
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, H, len(ids), D]
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> logits after it

    def truncate(self, n: int) -> None:
        """Forget every token from position n on."""
        if n >= len(self.ids):
            return
        self.ids = self.ids[:n]
        if self.layers is not None:
            self.layers = [(k[:, :, :n], v[:, :, :n]) for k, v in self.layers] if n else None
        self.rows = {p: r for p, r in self.rows.items() if p < n}

    def extend(self, new_ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor) -> None:
        """Record a forward pass over new_ids; rows are the outputs at its last positions."""
        self.ids = self.ids + new_ids
        self.layers = layers
        last = len(self.ids)
        self.rows.update({last - len(rows) + j: rows[j] for j in range(len(rows))})
        oldest = last - max(ROWS_KEPT, len(rows))
        self.rows = {p: r for p, r in self.rows.items() if p >= oldest}

    def nbytes(self) -> int:
        if self.layers is None:
            return 0
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
