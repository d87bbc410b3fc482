"""What the worker's sessions need from an inference engine: the seam another engine would implement.

The runtime (runtime.py: sessions, conditioning, sampling, distributions) decides which tokens a session's
model must condition on and which output rows it needs; a backend keeps the sessions' KV caches and runs
the forward passes. The transformers backend is engine.py (scheduler.py, kv_manager.py, model_runner.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

import torch

from model_worker.conditioning import Branch
from model_worker.scheduler import PassStats


class SessionCache(Protocol):
    """A session's cache as the runtime sees it: the tokens it holds, and the output rows kept."""

    ids: list[int]
    rows: dict[int, torch.Tensor]
    # branch -> the output logits after its tokens placed from its position on (conditioning.Branch)
    branch_rows: dict[Branch, torch.Tensor]

    def keep_rows(self, positions: set[int], branches: Collection[Branch] = ()) -> None: ...


@dataclass(frozen=True)
class KVReport:
    block_size: int
    blocks: int  # in the pool (its full-attention group, for models with several)
    blocks_free: int  # free or cached (an allocation may evict cached ones)
    held_bytes: int  # memory of the blocks sessions hold
    cached_bytes: int  # memory of the blocks kept for prefix hits that no session holds
    usage: float  # held blocks / blocks, 0-1 (the fullest group)
    prefix_hit_tokens: int  # tokens taken from the prefix cache since start


class Backend(Protocol):
    blocks_freed: asyncio.Event  # set when KV memory returns to the pool (admission waits on it)

    @property
    def queued(self) -> int:
        """Feeds waiting for or in a pass."""
        ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def warm_up(self) -> None:
        """One pass before serving (allocations, one-off costs)."""

    def new_cache(self, prompt: list[int]) -> SessionCache | None:
        """A new session's cache, holding what the prefix cache has of the prompt and room for the rest;
        None if the KV memory free cannot hold the prompt now."""

    async def forward(
        self, cache: SessionCache, new_ids: list[int], want: Collection[int], branches: Collection[Branch] = ()
    ) -> PassStats:
        """Append new_ids; cache.rows then holds the output logits at the `want` positions among them, and
        cache.branch_rows those of the `branches` that start at positions among them (rows after other
        tokens from such a position on: they see the keys before it and each other, in the same pass)."""
        ...

    def truncate(self, cache: SessionCache, n: int) -> None:
        """Forget positions n.. (the backend may forget more: the runtime re-feeds what is missing)."""

    def release(self, cache: SessionCache) -> None: ...

    def report(self) -> KVReport: ...
