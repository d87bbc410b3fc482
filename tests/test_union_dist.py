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
