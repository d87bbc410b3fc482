"""Prefix-aware placement: a request goes to the replica likely to hold its prompt's prefix in its KV
cache (rendezvous hashing of the prompt's leading bytes), or to the least loaded when that one is busy."""

from __future__ import annotations

from dataclasses import dataclass

import chorus
from chorus_common.types import Prompt
from chorus_local.cluster import start_coordinator
from coordinator import placement
from tests.cluster_helpers import MODELS, LoopThread, make_config, prefix_hit_tokens, worker


@dataclass
class _Replica:
    active: int = 0


def test_one_prefix_one_replica_many_prefixes_spread_and_a_busy_one_is_skipped() -> None:
    replicas = [(f"10.0.0.{i}:50061", _Replica()) for i in range(4)]
    keys = [placement.prefix_key(Prompt(text=f"system prompt {i}: " + "you are helpful. " * 4)) for i in range(64)]
    chosen = [placement.choose(replicas, k) for k in keys]
    assert chosen == [placement.choose(replicas, k) for k in keys]  # deterministic
    assert set(chosen) == {0, 1, 2, 3}  # 64 prefixes over 4 replicas: every one gets some
    # A chat's later turns begin with its earlier ones: the same key, the same replica.
    chat = Prompt(messages=(("system", "You are terse. " * 30), ("user", "hi")))
    later = Prompt(messages=(*chat.messages, ("assistant", "hello"), ("user", "how are you?")))
    assert placement.prefix_key(chat) == placement.prefix_key(later)
    # Removing a replica moves only the keys it held.
    fewer = [r for i, r in enumerate(replicas) if i != 2]
    for key, before in zip(keys, chosen, strict=True):
        if before != 2:
            assert fewer[placement.choose(fewer, key)][0] == replicas[before][0]
    # The prefix's replica, busier than the least loaded by MAX_IMBALANCE, is skipped.
    key = keys[0]
    best = placement.choose(replicas, key)
    replicas[best][1].active = placement.MAX_IMBALANCE
    assert placement.choose(replicas, key) != best
    replicas[best][1].active = placement.MAX_IMBALANCE - 1
    assert placement.choose(replicas, key) == best
    assert placement.choose(replicas, None) != best  # no key: the least loaded


def test_requests_sharing_a_prefix_meet_their_cached_blocks_on_one_of_two_replicas(loop: LoopThread) -> None:
    a, b = worker(MODELS / "arith-bpe", "arith-bpe"), worker(MODELS / "arith-bpe", "arith-bpe")
    try:
        config = make_config([a])
        running = loop.run(start_coordinator(config, [a.address], port=0))
        try:
            loop.run(running.ensemble.add_worker("arith-bpe", b.address))
            preamble = "12+34=46\n" * 8  # 72 bytes: the key is its first 64
            with chorus.Client(f"127.0.0.1:{running.port}", timeout=60) as client:
                for question in ("1+2=", "3+4=", "5+6=", "7+8="):
                    client.generate(prompt=preamble + question, max_new_tokens=2)
            hits = [loop.run(prefix_hit_tokens(w.address)) for w in (a, b)]
        finally:
            loop.run(running.stop(grace=0))
    finally:
        a.stop()
        b.stop()
    # All four went to one replica; the last three found the preamble's blocks there.
    assert sorted(hits)[0] == 0 and sorted(hits)[1] >= 3 * 3 * 16, hits
