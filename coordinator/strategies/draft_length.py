"""SAFE's draft length, following the agreement measured so far in the request.

Every drafted position the verifiers check counts as agreement (accepted: the models agree, or it
is inside a verifier's token) or not (ensembled); positions after the first ensembled one of a
draft are never checked and do not count. `agreement` is an exponential moving average of these
(weight AGREEMENT_WEIGHT per position, starting at START), so it follows the text the request is
writing now. The next draft is the longest one likely to be accepted whole: the largest length L
up to the upper bound (`safe.draft_tokens`) with agreement ** L >= 1/2, and at least one token.
Drafts grow while they are accepted and shrink to one token after a disagreement or two: with the
defaults a request's first draft has 3 tokens (5 after it if it is kept whole); after a long run of
agreement one disagreement brings the length to 3 tokens, a second to 1; from there five agreeing
positions in a row (more after a longer run of disagreement) bring it back to 5.

The half: a draft of L tokens costs L drafter passes, then a pass of each verifier, and what
follows its first disagreement is thrown away. Drafts kept whole at least half the time keep the
expected forward passes per token below GaC's (one per model); where the models agree for long,
they tend to 1 + (verifiers) / L.
"""

from __future__ import annotations

import math

START = 0.8  # the first draft of a request: 3 tokens (0.8 ** 3 > 1/2); five after it if it is kept whole
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
    def at_bound(self) -> bool:
        """Drafts are as long as allowed: the models have agreed for a while (or the length is fixed)."""
        return self.current == self.upper

    def checked(self, accepted: int, ensembled: bool) -> None:
        """A draft's check: `accepted` positions agreed, then (if `ensembled`) one was ensembled."""
        for _ in range(accepted):
            self.agreement += AGREEMENT_WEIGHT * (1.0 - self.agreement)
        if ensembled:
            self.agreement -= AGREEMENT_WEIGHT * self.agreement
