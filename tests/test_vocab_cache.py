"""The coordinator's vocabulary cache is bounded: the least recently used fingerprint goes first."""

from __future__ import annotations

from coordinator.union_vocab import ModelVocab
from coordinator.workers import VOCAB_CACHE_SIZE, VocabCache


def _vocab(token: bytes) -> ModelVocab:
    return ModelVocab(tokens=[token], special=[False], eos_ids=frozenset())


def test_the_least_recently_used_vocabulary_is_evicted() -> None:
    cache = VocabCache(2)
    a, b, c = _vocab(b"a"), _vocab(b"b"), _vocab(b"c")
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # now b is the least recently used
    cache.put("c", c)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (a, None, c, 2)


def test_the_process_wide_cache_holds_a_bounded_number() -> None:
    cache = VocabCache(VOCAB_CACHE_SIZE)
    for i in range(3 * VOCAB_CACHE_SIZE):
        cache.put(f"fingerprint-{i}", _vocab(b"x"))
    assert len(cache) == VOCAB_CACHE_SIZE
    assert cache.get(f"fingerprint-{3 * VOCAB_CACHE_SIZE - 1}") is not None and cache.get("fingerprint-0") is None
