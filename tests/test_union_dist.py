"""The fast paths of mapping and mixing distributions give exactly the general path's bits."""

from __future__ import annotations

import numpy as np
import pytest

from chorus_common.types import DistributionPart
from coordinator.union_dist import ExtraIds, _merge, from_parts, mix
from coordinator.union_vocab import ModelVocab, UnionVocab


def _vocabs(rng: np.random.Generator, k: int, size: int) -> list[ModelVocab]:
    pool = [bytes(rng.integers(97, 123, rng.integers(1, 5))) for _ in range(3 * size)]
    vocabs = []
    for m in range(k):
        tokens = [pool[int(i)] for i in rng.integers(0, len(pool), size)]  # duplicates: shared union ids
        special = [False] * size
        special[0] = True  # an EOS
        special[1] = True  # a special that is not text
        vocabs.append(ModelVocab(tokens=tokens, special=special, eos_ids=frozenset({0, 2 + m})))
    return vocabs


@pytest.mark.parametrize("dtype", ["<f2", "<f4"])
@pytest.mark.parametrize("seed", range(4))
def test_fast_paths_equal_the_general_merge(dtype: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocabs = _vocabs(rng, 3, 600)
    union = UnionVocab(vocabs)
    extras = ExtraIds(union)
    dists, general = [], []
    for m, vocab in enumerate(vocabs):
        logits = rng.normal(size=len(vocab.tokens)) * 3
        logprobs = (logits - np.logaddexp.reduce(logits)).astype(dtype)
        part = DistributionPart(skip_bytes=0, log_scale=0.0, ids=None, logprobs=logprobs)
        index = union.index[m]
        dists.append(from_parts([part], index, vocab.tokens, extras))  # the DenseMap path
        keep = index >= 0
        general.append(_merge([index[keep]], [np.exp(logprobs.astype(np.float64))[keep]], extras.size))
    for fast, slow in zip(dists, general, strict=True):
        assert np.array_equal(fast.uids, slow.uids) and np.array_equal(fast.probs, slow.probs)
    weights = rng.dirichlet(np.ones(3))
    fast_mix = mix(dists, weights, extras.size)
    slow_mix = _merge(
        [d.uids for d in general], [d.probs * w for d, w in zip(general, weights, strict=True)], extras.size
    )
    assert np.array_equal(fast_mix.uids, slow_mix.uids) and np.array_equal(fast_mix.probs, slow_mix.probs)


@pytest.mark.parametrize("seed", range(3))
def test_open_token_tails_map_as_one_lookup_per_token_would(seed: int) -> None:
    """Tokens extending a model's open last token arrive with `skip_bytes` already written: their tails map
    (through the union's kept lookups) to exactly the ids of a lookup per token, request-local ids for tails
    no model has as a token included, on a first and a repeated step, sparse and dense."""
    rng = np.random.default_rng(seed)
    vocabs = _vocabs(rng, 2, 500)
    union = UnionVocab(vocabs)

    def reference(m: int, ids: np.ndarray, skip: int, extras: ExtraIds) -> np.ndarray:
        return np.array([extras.uid(vocabs[m].tokens[i][skip:]) for i in ids.tolist()], dtype=np.int64)

    for m, vocab in enumerate(vocabs):
        for skip in (1, 2):
            ids = np.flatnonzero([len(t) > skip for t in vocab.tokens]).astype(np.uint32)
            logprobs = np.log(rng.dirichlet(np.ones(ids.size))).astype("<f4")
            sparse = DistributionPart(skip_bytes=skip, log_scale=-0.5, ids=ids, logprobs=logprobs)
            dense = DistributionPart(
                skip_bytes=skip, log_scale=0.0, ids=None, logprobs=np.full(len(vocab.tokens), -9.0, "<f4")
            )
            for part in (sparse, dense, sparse):  # the repeat reads what the first lookups kept
                fast, slow = ExtraIds(union), ExtraIds(union)
                got = from_parts([part], union.index[m], vocab.tokens, fast)
                every = np.arange(len(vocab.tokens)) if part.ids is None else part.ids.astype(np.int64)
                uids = reference(m, every, skip, slow)
                p = np.exp(part.logprobs.astype(np.float64) + part.log_scale)
                want = _merge([uids[uids >= 0]], [p[uids >= 0]], slow.size)
                assert np.array_equal(got.uids, want.uids) and np.array_equal(got.probs, want.probs)
                assert fast.by_bytes == slow.by_bytes  # the same request-local ids, in the same order
    # An index array that is not the union's own (a copy) takes the per-token path, with the same result.
    extras = ExtraIds(union)
    part = DistributionPart(
        skip_bytes=1, log_scale=0.0, ids=np.array([3, 4, 5], np.uint32), logprobs=np.zeros(3, "<f4")
    )
    copied = from_parts([part], union.index[0].copy(), vocabs[0].tokens, extras)
    assert np.array_equal(copied.uids, from_parts([part], union.index[0], vocabs[0].tokens, extras).uids)


def test_the_union_keeps_only_the_latest_tail_tables() -> None:
    """A table of tail lookups is as long as the model's vocabulary: a coordinator that met every skip length
    would keep them all for its lifetime (the load test saw its memory creep). Only the TAIL_TABLES used last
    are kept, and a lookup after its table was dropped is still exact."""
    from coordinator.union_vocab import TAIL_TABLES

    vocabs = [ModelVocab(tokens=[b" " * n + b"ab"[: n % 3] for n in range(1, 60)], special=[False] * 59, eos_ids=[])]
    union = UnionVocab(vocabs)
    index, tokens = union.index[0], vocabs[0].tokens
    ids = np.arange(len(tokens))

    def exact(skip: int) -> np.ndarray:
        found = [union.lookup(t[skip:]) if len(t) > skip else None for t in tokens]
        return np.array([-1 if uid is None else uid for uid in found], np.int64)

    for skip in range(1, 3 * TAIL_TABLES):
        assert np.array_equal(union.tail_ids(index, tokens, skip, ids), exact(skip))
        assert len(union._tails) == min(skip, TAIL_TABLES)
    union.tail_ids(index, tokens, 3 * TAIL_TABLES - TAIL_TABLES, ids)  # the oldest kept, used again: kept
    union.tail_ids(index, tokens, 1, ids)  # dropped long ago: made again, exact, evicting the least recent
    assert (0, 2 * TAIL_TABLES) in union._tails and (0, 2 * TAIL_TABLES + 1) not in union._tails
    assert np.array_equal(union.tail_ids(index, tokens, 1, ids), exact(1))
