"""SAFE's draft length, following the agreement measured so far in the request.

Every position the verifiers check counts as agreement (the skip rule accepted the drafter's token:
the models agree, or it is inside a verifier's token) or not (the position was ensembled, whatever
the ensemble then picked: the draft stopped there); positions after the first ensembled one of a
draft are never checked and do not count. Positions SAFE decides in lockstep (below) count alike.
`agreement` is an exponential moving average of these (weight AGREEMENT_WEIGHT per position,
starting at START), so it follows the text the request is writing now. The draft length is the
longest one likely to be accepted whole: the largest length L up to the upper bound
(`safe.draft_tokens`) with agreement ** L >= 1/2, and at least one token.

SAFE drafts only at the bound; below it, it steps in lockstep (`DraftLength.lockstep`): every model
is asked at once for its distribution at the position, as in GaC. A draft of L tokens costs L
drafter passes and then a pass of each verifier, one after the other, and what follows its first
disagreement is thrown away: on members that each take a CPU core (or a GPU) that is more time per
token than a GaC step unless most drafts are kept whole; at the bound the drafter drafts the next
chunk while the verifiers check this one, which takes the verification off its path. A request
starts in lockstep (START: one token); four agreeing positions in a row bring drafts of five tokens
(with the default bound), one disagreement after a long run of agreement brings lockstep back, and
from a run of disagreement seven to ten agreeing positions in a row bring drafting back.

The half: drafts kept whole at least half the time keep the expected forward passes per token
below GaC's (one per model); where the models agree for long, they tend to 1 + (verifiers) / L.
"""

from __future__ import annotations

import math

START = 0.7  # a request starts in lockstep; four agreeing positions bring drafts of five tokens
AGREEMENT_WEIGHT = 0.2  # weight of the newest position in the moving average
WHOLE = 0.5  # the chance a draft is accepted whole that its length aims at


class DraftLength:
    """The adaptive length of a request's drafts, within 1..upper."""

    def __init__(self, upper: int, adaptive: bool = True) -> None:
        self.upper = upper
        self.adaptive = adaptive
        self.agreement = START

    @property
    def current(self) -> int:
        return self.length_at(self.agreement)

    def length_at(self, agreement: float) -> int:
        """The largest L <= upper with agreement ** L >= WHOLE (1 at least); upper if not adaptive."""
        if not self.adaptive or agreement >= 1.0:
            return self.upper
        if agreement <= WHOLE:
            return 1
        return max(1, min(self.upper, math.floor(math.log(WHOLE) / math.log(agreement) + 1e-9)))

    @property
    def lockstep(self) -> bool:
        """Adaptive, and below the bound (or at one token): SAFE asks every model at once instead of
        drafting (safe.py). Drafts are only drawn at the bound, where the next one is drafted while the
        verifiers check this one; a shorter draft costs its drafter passes, then the verifiers' pass,
        in sequence."""
        return self.adaptive and self.current < max(2, self.upper)

    @property
    def at_bound(self) -> bool:
        """Drafts are as long as allowed: the models have agreed for a while (or the length is fixed)."""
        return self.current == self.upper

    def checked(self, accepted: int, ensembled: bool) -> None:
        """A draft's check: `accepted` positions agreed, then (if `ensembled`) one was ensembled."""
        for _ in range(accepted):
            self.agreement += AGREEMENT_WEIGHT * (1.0 - self.agreement)
        if ensembled:
            self.agreement -= AGREEMENT_WEIGHT * self.agreement
