"""KV blocks: which of a pool's fixed-size blocks are free, held, or cached for reuse (no tensors here).

A session holds the blocks its tokens fill (a block table). Blocks are reference-counted: sessions whose
token prefixes are identical share the blocks of that prefix. A *full* block can be registered under a
content hash (its tokens and the hash of the block before it, as vLLM's automatic prefix caching does),
so a later session whose tokens begin the same way takes those blocks instead of computing them. A
registered block nobody holds stays cached (least recently released first out) until its space is needed.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The content key of a full block: its tokens, chained to every block before it."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


@dataclass
class PoolStats:
    evictions: int = 0  # cached blocks whose space was reused


class BlockPool:
    """Blocks 0..n-1 of one storage. Allocation prefers the block after a given one, so a session's
    blocks tend to be contiguous (attention then reads them as few runs)."""

    def __init__(self, blocks: int, block_size: int) -> None:
        if blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of one token (got {blocks} x {block_size})")
        self.blocks = blocks
        self.block_size = block_size
        self._refs = [0] * blocks
        self._free: set[int] = set(range(blocks))  # neither held nor cached
        self._lowest = list(range(blocks))  # a heap over _free (entries no longer free are skipped)
        self._hash_of: dict[int, bytes] = {}  # registered blocks
        self._by_hash: dict[bytes, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # registered, held by nobody: LRU order
        self.stats = PoolStats()

    @property
    def available(self) -> int:
        """Blocks an allocation can take: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._cached)

    @property
    def held(self) -> int:
        return self.blocks - self.available

    @property
    def cached(self) -> int:
        """Registered blocks nobody holds: kept for a later prefix hit until their space is needed."""
        return len(self._cached)

    def allocate(self, n: int, after: int | None = None) -> list[int] | None:
        """n blocks, or None if fewer are available (nothing is taken then). Free blocks first, lowest and
        contiguous with `after` where possible; then the least recently released cached ones (evicted)."""
        if n > self.available:
            return None
        out: list[int] = []
        nxt = after + 1 if after is not None else None
        while len(out) < n:
            if nxt is not None and nxt in self._free:
                block = nxt
            elif self._free:
                block = self._lowest_free_run(n - len(out)) if n - len(out) > 1 else self._pop_lowest()
            else:
                block, _ = self._cached.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
                self.stats.evictions += 1
            self._free.discard(block)
            self._refs[block] = 1
            out.append(block)
            nxt = block + 1
        return out

    def _pop_lowest(self) -> int:
        while self._lowest[0] not in self._free:
            heapq.heappop(self._lowest)
        return self._lowest[0]

    def _add_free(self, block: int) -> None:
        self._free.add(block)
        heapq.heappush(self._lowest, block)

    def _lowest_free_run(self, want: int) -> int:
        """The first block of the lowest run of `want` free blocks, else the lowest free block."""
        ordered = sorted(self._free)
        start = prev = ordered[0]
        for b in ordered[1:]:
            if prev - start + 1 >= want:
                return start
            if b != prev + 1:
                start = b
            prev = b
        return start if prev - start + 1 >= want else ordered[0]

    def hold(self, block: int) -> None:
        """Another holder of a block (a prefix-cache hit)."""
        if self._refs[block] == 0:
            self._cached.pop(block, None)
        self._refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._cached[block] = None
                else:
                    self._add_free(block)

    def shared(self, block: int) -> bool:
        """Another session holds it too, or its content is registered (writing to it would change a cached block)."""
        return self._refs[block] > 1 or block in self._hash_of

    def register(self, block: int, key: bytes) -> None:
        """A full block's content key; a block whose content is already registered under another block stays
        unregistered (both hold the same keys and values; the first one is the one found)."""
        if key in self._by_hash or block in self._hash_of:
            return
        self._hash_of[block] = key
        self._by_hash[key] = block

    def lookup(self, key: bytes) -> int | None:
        return self._by_hash.get(key)

    def clear_cache(self) -> None:
        """Forget every cached block nobody holds."""
        for block in list(self._cached):
            del self._by_hash[self._hash_of.pop(block)]
            self._add_free(block)
        self._cached.clear()
