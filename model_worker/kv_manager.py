"""The worker's KV cache: paged storage, each session's block tables, prefix sharing and sliding windows.

Layers are grouped by how they attend (kv_layout.py): full-attention layers keep every position, and
sliding-window layers keep only their window (their blocks before it are released as the text grows).
Each group has its own pool of blocks and storage; a session holds one block table per group. A block
holds `block_size` consecutive positions of every layer of its group.

Prefix caching: a session's full blocks are registered, in every group, under a content hash of the
tokens up to them; a session whose tokens begin the same way holds those blocks instead of computing
them. A hit of P positions needs the full groups' blocks of the whole prefix, and the sliding groups'
blocks of its last window only (as vLLM's hybrid cache manager does): the positions before it are never
read again. Sliding pools hold little more than each session's window, so their blocks are evicted
sooner, and a long shared prefix is then found only up to where its sliding blocks were kept.
A block that is shared or registered is never written again: a session that truncates into it first
copies the positions it keeps into a block of its own (copy on write).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from model_worker.conditioning import Branch
from model_worker.kv_blocks import BlockPool, block_hash
from model_worker.kv_layout import KVGroup, KVLayout

# Positions a sliding-window group keeps past its window, so that a rollback of a few tokens (re-tokenized
# tails, rejected drafts) does not need the positions already released; a longer one recomputes.
WINDOW_MARGIN = 64


def uninitialized(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass
class SessionKV:
    """One session's cache: the tokens whose keys and values are stored, where, and the output rows kept."""

    ids: list[int] = field(default_factory=list)  # tokens cached, in order
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> output logits after it
    # branch -> the output logits after its tokens placed from its position on (conditioning.Branch)
    branch_rows: dict[Branch, torch.Tensor] = field(default_factory=dict)
    tables: list[list[int | None]] = field(default_factory=list)  # per group: block of each logical block
    keys: list[bytes] = field(default_factory=list)  # content keys of its full blocks (prefix caching)

    def keep_rows(self, positions: set[int], branches: Collection[Branch] = ()) -> None:
        self.rows = {p: r for p, r in self.rows.items() if p in positions}
        self.branch_rows = {b: r for b, r in self.branch_rows.items() if b in branches}

    def forget_rows_from(self, n: int) -> None:
        """Drop the rows that positions n.. made: a branch at n read only the positions before it."""
        self.rows = {p: r for p, r in self.rows.items() if p < n}
        self.branch_rows = {b: r for b, r in self.branch_rows.items() if b[0] <= n}


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than a feed needs."""


class KVManager:
    def __init__(
        self,
        layout: KVLayout,
        budget: int,
        sessions: int,
        context: int,
        block_size: int,
        device: torch.device,
        prefix_caching: bool = True,
    ) -> None:
        """`budget`: bytes for keys and values (0: room for `sessions` sessions of `context` tokens)."""
        self.layout = layout
        self.block_size = block_size
        self.device = device
        blocks = layout.pool_blocks(budget, sessions, context, block_size, WINDOW_MARGIN)
        # One more block per pool: block 0, never handed out, is the scratch space that padding rows of a
        # static decode pass write to.
        self.pools = [BlockPool(n + 1, block_size) for n in blocks]
        for pool in self.pools:
            assert pool.allocate(1) == [0]
        # Keys and values per layer: [kv_heads, blocks * block_size, head_dim], so the blocks of a session that
        # lie next to each other are one strided view (attention reads them without a copy). A group's layers
        # are views of one tensor [2, layers, kv_heads, positions, head_dim], so that zeroing blocks is one
        # operation for all of them (a launch per layer cost a third of the event loop's time on a GPU).
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._storage: list[torch.Tensor] = []
        for group, pool in zip(layout.groups, self.pools, strict=True):
            shape = (2, len(group.layers), layout.kv_heads, pool.blocks * block_size, layout.head_dim)
            # Uninitialised: on CPU, pages never written cost no memory; blocks are zeroed when handed out.
            storage = uninitialized(shape, layout.dtype, device)
            self._storage.append(storage)
            for i, layer in enumerate(group.layers):
                self.keys[layer], self.values[layer] = storage[0, i], storage[1, i]
        for g in range(len(layout.groups)):
            self._zero(g, [0])
        self.prefix_caching = prefix_caching
        self.hits = 0  # blocks (positions of every group) taken from the prefix cache

    # ------------------------------------------------------------------ capacity

    def blocks_needed(self, kv: SessionKV, length: int) -> list[int]:
        """Blocks each group must still allocate for the session to hold `length` positions."""
        need = []
        for group, table in zip(self.layout.groups, self._tables(kv), strict=True):
            total = -(-length // self.block_size)
            first = self._first_kept_block(group, length, len(kv.ids))
            present = len(table)
            need.append(max(0, total - max(present, first)))
        return need

    def can_hold(self, kv: SessionKV, length: int) -> bool:
        return all(n <= pool.available for n, pool in zip(self.blocks_needed(kv, length), self.pools, strict=True))

    def reserve(self, kv: SessionKV, length: int) -> None:
        """Allocate the blocks for positions up to `length` (all or nothing: OutOfBlocks)."""
        if not self.can_hold(kv, length):
            raise OutOfBlocks(f"{length} positions need more KV blocks than are free")
        for g, (group, pool, table) in enumerate(zip(self.layout.groups, self.pools, self._tables(kv), strict=True)):
            total = -(-length // self.block_size)
            first = self._first_kept_block(group, length, len(kv.ids))
            while len(table) < min(first, total):  # positions already out of the window: never stored
                table.append(None)
            n = total - len(table)
            if n > 0:
                last = next((b for b in reversed(table) if b is not None), None)
                blocks = pool.allocate(n, after=last)
                assert blocks is not None  # checked above
                self._zero(g, blocks)
                table.extend(blocks)

    def _zero(self, g: int, blocks: list[int]) -> None:
        """Blocks handed out (in group g) hold zeros: the gathered decode form reads a block's positions past the
        session's length (masked), and whatever memory held before (NaN too) must not reach a product."""
        bs = self.block_size
        where = (torch.tensor(blocks, device=self.device)[:, None] * bs + torch.arange(bs, device=self.device)).view(-1)
        with torch.inference_mode():
            self._storage[g].index_fill_(3, where, 0)

    def _tables(self, kv: SessionKV) -> list[list[int | None]]:
        while len(kv.tables) < len(self.pools):
            kv.tables.append([])
        return kv.tables

    def _first_kept_block(self, group: KVGroup, length: int, written_from: int | None = None) -> int:
        """The first logical block a group keeps for a text of `length` positions (and, while a pass writes
        positions from `written_from` on, for those too: the pass's own queries attend to them)."""
        if group.window is None:
            return 0
        first = max(0, length - group.window - WINDOW_MARGIN) // self.block_size
        return first if written_from is None else min(first, written_from // self.block_size)

    # ------------------------------------------------------------------ a session's life

    def truncate(self, kv: SessionKV, n: int) -> None:
        """Forget positions n.. (a rollback). Blocks past the new end are released; a shared or registered
        block that keeps some positions is copied first. If a sliding group no longer holds the window the
        positions before n need, the session restarts from nothing (its next feed recomputes)."""
        if n >= len(kv.ids):
            kv.forget_rows_from(n)
            return
        keep = -(-n // self.block_size)
        for group, table in zip(self.layout.groups, self._tables(kv), strict=True):
            if group.window is not None and n and None in table[self._window_start(group, n) : keep]:
                self.free(kv)
                return
        del kv.ids[n:]
        kv.forget_rows_from(n)
        del kv.keys[n // self.block_size :]
        for g, (pool, table) in enumerate(zip(self.pools, self._tables(kv), strict=True)):
            pool.release([b for b in table[keep:] if b is not None])
            del table[keep:]
            if n % self.block_size and table and table[-1] is not None and pool.shared(table[-1]):
                table[-1] = self._copy_block(g, table[-1], n % self.block_size)

    def _window_start(self, group: KVGroup, n: int) -> int:
        assert group.window is not None
        return max(0, n - group.window) // self.block_size

    def _copy_block(self, g: int, block: int, positions: int) -> int:
        pool = self.pools[g]
        new = pool.allocate(1)
        if new is None:
            raise OutOfBlocks("no KV block free to copy a shared block into")
        self._zero(g, new)
        pool.release([block])
        src, dst = block * self.block_size, new[0] * self.block_size
        with torch.inference_mode():
            for layer in self.layout.groups[g].layers:
                for store in (self.keys[layer], self.values[layer]):
                    store[:, dst : dst + positions] = store[:, src : src + positions]
        return new[0]

    def free(self, kv: SessionKV) -> None:
        """Release every block of the session (registered ones stay cached for later sessions)."""
        for pool, table in zip(self.pools, self._tables(kv), strict=True):
            pool.release([b for b in table if b is not None])
            table.clear()
        kv.ids.clear()
        kv.rows.clear()
        kv.branch_rows.clear()
        kv.keys.clear()

    def trim_windows(self, kv: SessionKV) -> None:
        """Release the blocks that sliding-window groups no longer need."""
        length = len(kv.ids)
        for group, pool, table in zip(self.layout.groups, self.pools, self._tables(kv), strict=True):
            if group.window is None:
                continue
            for i in range(min(self._first_kept_block(group, length), len(table))):
                if table[i] is not None:
                    pool.release([table[i]])  # type: ignore[list-item]
                    table[i] = None

    # ------------------------------------------------------------------ prefix caching

    def match_prefix(self, kv: SessionKV, tokens: list[int], before: int) -> int:
        """Take cached blocks for the next of `tokens` (which follow kv.ids), each wholly before position
        `before` (rows wanted from there on must be computed). Returns how many tokens were taken."""
        if not self.prefix_caching or len(kv.ids) % self.block_size:
            return 0
        bs, base = self.block_size, len(kv.ids) // self.block_size
        # The longest run of blocks the full groups hold, with what each sliding group holds of it.
        found: list[tuple[bytes, list[int | None]]] = []
        parent = kv.keys[-1] if kv.keys else b""
        while len(kv.ids) + (len(found) + 1) * bs <= before and (len(found) + 1) * bs <= len(tokens):
            key = block_hash(parent, tokens[len(found) * bs : (len(found) + 1) * bs])
            blocks = [pool.lookup(key) for pool in self.pools]
            if any(b is None for g, b in zip(self.layout.groups, blocks, strict=True) if g.window is None):
                break
            found.append((key, blocks))
            parent = key
        # The longest of these prefixes whose last window every sliding group holds.
        m = len(found)
        while m and not self._windows_held(found, base, m):
            m -= 1
        groups = list(zip(self.layout.groups, self.pools, self._tables(kv), strict=True))
        for i, (key, blocks) in enumerate(found[:m]):
            logical = base + i
            for g, (group, pool, table) in enumerate(groups):
                block = blocks[g] if logical >= self._first_kept_block(group, (base + m) * bs) else None
                if block is not None:
                    pool.hold(block)
                if logical < len(table):  # a block reserved for these positions, not written yet: give it back
                    reserved = table[logical]
                    if reserved is not None:
                        pool.release([reserved])
                    table[logical] = block
                else:
                    table.append(block)
            kv.keys.append(key)
            kv.ids.extend(tokens[i * bs : (i + 1) * bs])
        self.hits += m
        return m * bs

    def _windows_held(self, found: list[tuple[bytes, list[int | None]]], base: int, m: int) -> bool:
        """Whether every sliding group holds the blocks a text of the first m found blocks keeps."""
        length = (base + m) * self.block_size
        for g, group in enumerate(self.layout.groups):
            if group.window is not None:
                first = self._first_kept_block(group, length)
                if any(blocks[g] is None for _, blocks in found[max(0, first - base) : m]):
                    return False
        return True

    def register_full_blocks(self, kv: SessionKV) -> None:
        """Register the session's blocks that became full since the last call, in every group that keeps them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        while len(kv.keys) < len(kv.ids) // bs:
            i = len(kv.keys)
            key = block_hash(kv.keys[-1] if kv.keys else b"", kv.ids[i * bs : (i + 1) * bs])
            kv.keys.append(key)
            for pool, table in zip(self.pools, self._tables(kv), strict=True):
                if i < len(table) and table[i] is not None:
                    pool.register(table[i], key)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ reports

    @property
    def evictions(self) -> int:
        return sum(p.stats.evictions for p in self.pools)

    def usage(self) -> float:
        """Held blocks as a fraction of all blocks (the fullest group; the scratch block not counted)."""
        return max((p.held - 1) / (p.blocks - 1) for p in self.pools)

    def held_bytes(self) -> int:
        return sum(
            (p.held - 1) * self.block_size * g.bytes_per_token
            for g, p in zip(self.layout.groups, self.pools, strict=True)
        )

    def cached_bytes(self) -> int:
        """Memory of the blocks kept for prefix hits that no session holds. On CPU their pages stay resident:
        with distinct prompts this grows toward the pool's size (the KV budget), then evictions begin."""
        return sum(
            p.cached * self.block_size * g.bytes_per_token for g, p in zip(self.layout.groups, self.pools, strict=True)
        )
