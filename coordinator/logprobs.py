"""Log-probabilities of generated tokens, from the distribution each one was drawn from.

That distribution is the one `sampling.pick` draws from (`sampling.drawn_from`): the decision's
distribution (the ensemble's mix, or one model's alone) tempered and cut to top-k / top-p when
sampling, the decision's distribution itself (normalised) when greedy.
"""

from __future__ import annotations

import numpy as np

from chorus_common.sampling import drawn_from
from chorus_common.types import SamplingParams
from coordinator.types import TokenLogprob
from coordinator.union_dist import ExtraIds, UnionDist

MAX_TOP = 20  # alternatives per token at most (OpenAI's top_logprobs bound)


def token_logprob(dist: UnionDist, params: SamplingParams, uid: int, top: int, extras: ExtraIds) -> TokenLogprob:
    """The drawn entry uid's log-probability and the `top` most likely entries (end of sequence: None)."""
    keep, p = drawn_from(dist.probs, params)
    uids = dist.uids[keep]
    at = np.flatnonzero(uids == uid)
    logprob = float(np.log(p[at[0]])) if at.size and p[at[0]] > 0 else -np.inf
    alternatives: list[tuple[bytes | None, float]] = []
    if top:
        for k in np.argsort(-p, kind="stable")[: min(top, MAX_TOP)]:
            if p[k] <= 0:
                break
            other = int(uids[k])
            alternatives.append((None if extras.union.is_end(other) else extras.bytes_of(other), float(np.log(p[k]))))
    return TokenLogprob(extras.bytes_of(uid), logprob, tuple(alternatives))
