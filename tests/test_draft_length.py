"""SAFE's adaptive draft length: grows while drafts are accepted, shrinks toward one token when not."""

from __future__ import annotations

import pytest

from coordinator.strategies.draft_length import DraftLength


def test_a_request_starts_at_three_tokens_and_reaches_five_if_its_first_draft_is_kept() -> None:
    assert [DraftLength(upper).current for upper in (1, 2, 3, 5, 64)] == [1, 2, 3, 3, 3]
    length = DraftLength(5)
    length.checked(3, ensembled=False)
    assert length.current == 5


def test_disagreements_shrink_the_draft_to_one_token() -> None:
    length = DraftLength(5)
    for _ in range(20):
        length.checked(1, ensembled=False)
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
    length.checked(3, ensembled=False)
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
