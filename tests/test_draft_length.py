"""SAFE's adaptive draft length: grows while drafts are accepted, shrinks toward one token when not."""

from __future__ import annotations

import pytest

from coordinator.strategies.draft_length import DraftLength


def _after_long_agreement() -> DraftLength:
    """A length at the default bound after twenty agreeing positions in a row."""
    length = DraftLength(5)
    for _ in range(20):
        length.checked(1, ensembled=False)
    return length


def test_a_request_starts_in_lockstep_and_drafts_after_four_agreeing_positions() -> None:
    assert [DraftLength(upper).current for upper in (1, 2, 3, 5, 64)] == [1, 1, 1, 1, 1]
    length = DraftLength(5)
    for _ in range(3):
        assert length.lockstep
        length.checked(1, ensembled=False)
    assert length.lockstep and length.current == 4  # below the bound: still every model at once
    length.checked(1, ensembled=False)
    assert not length.lockstep and length.current == 5


def test_lockstep_below_the_bound_only_with_adaptive_lengths() -> None:
    length = _after_long_agreement()
    assert not length.lockstep
    length.checked(0, ensembled=True)  # one disagreement after a long run of agreement
    assert length.current == 3 and length.lockstep
    runs = []
    for start in (0.0, 0.5):
        length.agreement, n = start, 0
        while length.lockstep:
            length.checked(1, ensembled=False)
            n += 1
        runs.append(n)
    assert runs == [10, 7]  # agreeing positions in a row that bring drafting back
    assert not DraftLength(5, adaptive=False).lockstep
    assert DraftLength(1).lockstep and DraftLength(1, adaptive=False).current == 1
    two = DraftLength(2)
    assert two.lockstep
    two.checked(2, ensembled=False)
    assert not two.lockstep and two.current == 2


def test_disagreements_shrink_the_draft_to_one_token() -> None:
    length = _after_long_agreement()
    assert length.current == 5
    length.checked(0, ensembled=True)
    assert length.current == 3  # about 0.798: 0.798 ** 3 >= 1/2 > 0.798 ** 4
    length.checked(0, ensembled=True)
    assert length.current == 1
    for _ in range(10):
        length.checked(0, ensembled=True)
        assert length.current == 1  # never below one token


def test_agreement_grows_the_draft_back_to_the_bound_and_no_further() -> None:
    length = DraftLength(5)
    for _ in range(3):
        length.checked(0, ensembled=True)
    lengths = []
    for _ in range(12):
        length.checked(1, ensembled=False)
        lengths.append(length.current)
    assert lengths == sorted(lengths)  # grows monotonically while positions agree
    assert lengths[0] == 1 and lengths[-1] == 5
    assert 1 < lengths[5] < 5  # step by step, not at once


def test_accepted_positions_before_an_ensembled_one_count_as_agreement() -> None:
    early, late = DraftLength(5), DraftLength(5)
    early.checked(0, ensembled=True)
    late.checked(4, ensembled=True)
    assert late.agreement > early.agreement
    assert late.current >= early.current


def test_at_the_bound_only_after_a_run_of_agreement() -> None:
    length = DraftLength(5)
    assert not length.at_bound
    length.checked(4, ensembled=False)
    assert length.at_bound
    length.checked(2, ensembled=True)
    assert not length.at_bound
    for _ in range(10):
        length.checked(1, ensembled=False)
    assert length.at_bound


@pytest.mark.parametrize("upper", [1, 2, 5, 64])
def test_not_adaptive_every_draft_is_the_bound(upper: int) -> None:
    length = DraftLength(upper, adaptive=False)
    for _ in range(5):
        length.checked(0, ensembled=True)
        assert length.current == upper and length.at_bound


@pytest.mark.parametrize("agreement", [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_the_length_is_the_longest_draft_likely_accepted_whole(agreement: float) -> None:
    length = DraftLength(64)
    n = length.length_at(agreement)
    assert 1 <= n <= 64
    if n > 1:
        assert agreement**n >= 0.5  # accepted whole at least half the time ...
    if n < 64:
        assert agreement ** (n + 1) < 0.5  # ... and one token more would not be
