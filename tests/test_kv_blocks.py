"""The KV block pool and manager: allocation, sharing, prefix caching with LRU eviction, copy on write,
sliding windows; and the scheduler's rounds (one pass per round under a token budget)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_worker.host_memory import memory_left
from model_worker.kv_blocks import BlockPool, block_hash
from model_worker.kv_layout import FULL, SLIDING, KVGroup, KVLayout
from model_worker.kv_manager import WINDOW_MARGIN, KVManager, OutOfBlocks, SessionKV
from model_worker.runtime import CPU_KV_BUDGET, auto_kv_budget, gpu_pass_reserve
from model_worker.scheduler import Feed, plan_round

BS = 4


def _layout(window: int | None = None) -> KVLayout:
    groups = [KVGroup(FULL, (0,), None, 2 * 2 * 4 * 4)]
    if window:
        groups.append(KVGroup(SLIDING, (1,), window, 2 * 2 * 4 * 4))
    return KVLayout(tuple(groups), kv_heads=2, head_dim=4, dtype=torch.float32)


def _manager(blocks: int, window: int | None = None, prefix: bool = True) -> KVManager:
    layout = _layout(window)
    budget = blocks * BS * layout.groups[0].bytes_per_token
    if window:
        budget += 4 * (-(-(window + WINDOW_MARGIN) // BS) + 1) * BS * layout.groups[1].bytes_per_token
    return KVManager(layout, budget, 4, blocks * BS, BS, torch.device("cpu"), prefix_caching=prefix)


def _fill(kv: KVManager, session: SessionKV, tokens: list[int]) -> None:
    """As a pass would: reserve, write each position's keys (its token id) and register full blocks."""
    start = len(session.ids)
    kv.reserve(session, start + len(tokens))
    for offset, token in enumerate(tokens):
        p = start + offset
        for g, group in enumerate(kv.layout.groups):
            block = session.tables[g][p // BS]
            for layer in group.layers:
                kv.keys[layer][:, block * BS + p % BS] = float(token)
    session.ids.extend(tokens)
    kv.register_full_blocks(session)
    kv.trim_windows(session)


def _keys_at(kv: KVManager, session: SessionKV, positions: range) -> list[float]:
    return [float(kv.keys[0][0, session.tables[0][p // BS] * BS + p % BS, 0]) for p in positions]  # type: ignore[operator]


def test_the_pool_prefers_contiguous_blocks_and_refuses_what_it_does_not_have() -> None:
    pool = BlockPool(10, BS)
    a = pool.allocate(3)
    assert a == [0, 1, 2]
    b = pool.allocate(2)
    assert b == [3, 4]
    assert pool.allocate(1, after=2) == [5]  # 3 is taken: the lowest free one
    pool.release([1])
    assert pool.allocate(1, after=0) == [1]  # right after its predecessor when free
    assert pool.allocate(5) is None and pool.available == 4  # nothing taken when it does not fit


def test_released_registered_blocks_stay_cached_until_space_is_needed_least_recent_first() -> None:
    pool = BlockPool(3, BS)
    blocks = pool.allocate(3)
    assert blocks is not None
    keys = [block_hash(b"", [i] * BS) for i in range(3)]
    for block, key in zip(blocks, keys, strict=True):
        pool.register(block, key)
    assert pool.cached == 0
    pool.release([blocks[1]])
    pool.release([blocks[0]])  # released last: evicted last
    assert pool.available == 2 and pool.cached == 2 and pool.lookup(keys[0]) == blocks[0]
    assert pool.allocate(1) == [blocks[1]] and pool.stats.evictions == 1 and pool.cached == 1
    assert pool.lookup(keys[1]) is None and pool.lookup(keys[0]) == blocks[0]
    pool.hold(blocks[0])  # a hit takes it out of the cache's eviction order
    assert pool.available == 0 and pool.cached == 0 and pool.allocate(1) is None


def test_a_prefix_is_shared_and_a_truncation_into_a_shared_block_copies_it() -> None:
    kv = _manager(blocks=16)
    first, second = SessionKV(), SessionKV()
    prompt = list(range(10))  # two full blocks and two tokens
    _fill(kv, first, prompt)
    taken = kv.match_prefix(second, prompt, before=len(prompt) - 1)
    assert taken == 2 * BS and second.tables[0] == first.tables[0][:2] and kv.hits == 2
    _fill(kv, second, prompt[taken:])
    assert _keys_at(kv, second, range(10)) == [float(t) for t in prompt]
    # The second session rolls back into its second (shared) block and writes other tokens there.
    kv.truncate(second, 6)
    assert second.tables[0][0] == first.tables[0][0] and second.tables[0][1] != first.tables[0][1]
    _fill(kv, second, [99, 98])
    assert _keys_at(kv, second, range(8)) == [0.0, 1, 2, 3, 4, 5, 99, 98]
    assert _keys_at(kv, first, range(10)) == [float(t) for t in prompt]  # the first session's text is intact
    # Only whole blocks before the first wanted row are taken: the row's token must be computed.
    third = SessionKV()
    assert kv.match_prefix(third, prompt, before=7) == BS


def test_sessions_hold_the_blocks_they_use_and_give_them_back() -> None:
    kv = _manager(blocks=8, prefix=False)
    sessions = [SessionKV() for _ in range(4)]
    for s in sessions:
        _fill(kv, s, [1] * 5)  # 2 blocks each
    assert kv.pools[0].available == 0
    with pytest.raises(OutOfBlocks):
        kv.reserve(sessions[0], 9)
    kv.truncate(sessions[0], 3)  # back inside its first block: the second one is free again
    assert kv.pools[0].available == 1
    kv.free(sessions[1])
    assert kv.pools[0].available == 3 and not sessions[1].ids


def test_sliding_window_groups_keep_only_their_window_and_a_long_rollback_recomputes() -> None:
    window = 8
    kv = _manager(blocks=64, window=window)
    session = SessionKV()
    _fill(kv, session, list(range(200)))
    full, sliding = session.tables
    assert all(b is not None for b in full)
    kept = [b for b in sliding if b is not None]
    assert len(kept) <= -(-(window + WINDOW_MARGIN) // BS) + 1  # the window and its margin, not 200 positions
    kv.truncate(session, 190)  # a short rollback: the window before 190 is still there
    assert len(session.ids) == 190
    kv.truncate(session, 60)  # past what the sliding layers kept: the session starts over
    assert session.ids == [] and all(not t for t in session.tables)


def test_a_prefix_hit_needs_the_whole_prefix_of_full_groups_and_only_the_last_window_of_sliding_ones() -> None:
    window = 8
    kv = _manager(blocks=128, window=window)
    text = list(range(200))
    first = SessionKV()
    _fill(kv, first, text)  # its sliding blocks before the window are released, and stay cached
    # Drop what nobody holds in the sliding pool: only the first session's window is left there.
    kv.pools[1].clear_cache()
    again = SessionKV()
    assert kv.match_prefix(again, [*text, 7], before=200) == 200 and kv.hits == 50
    full, sliding = again.tables
    assert full == first.tables[0][:50]
    kept = kv._first_kept_block(kv.layout.groups[1], 200)
    assert sliding[:kept] == [None] * kept and sliding[kept:] == first.tables[1][kept:50]
    _fill(kv, again, [7])
    assert _keys_at(kv, again, range(201)) == [float(t) for t in [*text, 7]]
    # A shorter prefix would need sliding blocks nobody kept: none of it is taken.
    assert kv.match_prefix(SessionKV(), [*text[:100], 5], before=100) == 0
    # Without the eviction, the shorter prefix's window is still cached and it is found whole.
    kv2 = _manager(blocks=128, window=window)
    _fill(kv2, SessionKV(), text)
    short = SessionKV()
    assert kv2.match_prefix(short, [*text[:100], 5], before=100) == 100
    assert all(b is not None for b in short.tables[1][kv2._first_kept_block(kv2.layout.groups[1], 100) :])


def test_one_round_runs_every_decode_and_chunks_of_several_prompts_under_the_token_budget() -> None:
    kv = _manager(blocks=64, prefix=False)

    def feed(tokens: int, at: float) -> Feed:
        return Feed(SessionKV(), [1] * tokens, {tokens - 1}, None, 0, queued_at=at)  # type: ignore[arg-type]

    prompts = [feed(30, 1.0), feed(30, 2.0), feed(30, 3.0)]
    decodes = [feed(1, 4.0), feed(1, 5.0)]

    def reserve(f: Feed, n: int) -> bool:
        if not kv.can_hold(f.kv, len(f.kv.ids) + n):
            return False
        kv.reserve(f.kv, len(f.kv.ids) + n)
        return True

    slices = plan_round([*prompts, *decodes], max_tokens=48, chunk=16, reserve=reserve)
    # Decodes first (though they came last), then 16-token chunks of the oldest prompts while 48 tokens fit.
    assert [(s.feed, len(s.tokens)) for s in slices] == [
        (decodes[0], 1),
        (decodes[1], 1),
        (prompts[0], 16),
        (prompts[1], 16),
        (prompts[2], 14),
    ]
    assert sum(len(s.tokens) for s in slices) == 48


def test_the_auto_pool_on_cuda_leaves_room_for_the_largest_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the pool takes 90% of the memory free after loading, less a gathered batch and the output rows
    of the largest static pass (2,048 rows of the vocabulary)."""
    layout = KVLayout((KVGroup(FULL, (0,), None, 256),), kv_heads=2, head_dim=32, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 << 30, 80 << 30))
    cuda = torch.device("cuda")
    reserve = gpu_pass_reserve(layout, 128_000)
    assert reserve == (512 << 20) + 2048 * 128_000 * 8  # bf16 rows, the rows picked, those in float32
    assert auto_kv_budget(cuda, layout, 10**6, 1 << 20, vocab=128_000) == int((40 << 30) * 0.9) - reserve
    assert auto_kv_budget(cuda, layout, 64, 1024, vocab=128_000) == 64 * 1024 * 256  # sessions' full contexts


def test_the_auto_pool_on_cpu_is_4_gib_at_most_half_the_memory_left(tmp_path: Path) -> None:
    """On CPU the pool's pages become resident as blocks are used: without a budget it is 4 GiB, but never more
    than half of what the host or the container's limit leaves (a pod limited to 2 GiB is not OOM-killed)."""
    layout = KVLayout((KVGroup(FULL, (0,), None, 256),), kv_heads=2, head_dim=32, dtype=torch.float32)
    cpu = torch.device("cpu")
    assert auto_kv_budget(cpu, layout, 64, 1 << 20, left=100 << 30) == CPU_KV_BUDGET
    assert auto_kv_budget(cpu, layout, 64, 1 << 20, left=2 << 30) == 1 << 30
    assert auto_kv_budget(cpu, layout, 64, 1024, left=100 << 30) == 64 * 1024 * 256  # sessions' full contexts
    assert auto_kv_budget(cpu, layout, 64, 1024, left=0) == 1024 * 256 + 2**20  # one context at least
    # What is left: the cgroup's limit less its usage (v2), or MemAvailable, whichever is less.
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "memory.max").write_text("3221225472\n")
    (tmp_path / "cg" / "memory.current").write_text("1073741824\n")
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable: 8388608 kB\n")
    assert memory_left(tmp_path / "cg", tmp_path / "meminfo") == 2 << 30
    (tmp_path / "cg" / "memory.max").write_text("max\n")
    assert memory_left(tmp_path / "cg", tmp_path / "meminfo") == 8 << 30
    assert memory_left(tmp_path / "none", tmp_path / "none") is None
