"""Canonical tokenization and token healing, below the server."""

from __future__ import annotations

import numpy as np
import pytest

from model_worker.conditioning import PrefixIndex, split_utf8


@pytest.mark.parametrize(
    ("data", "valid", "pending"),
    [
        (b"", b"", b""),
        (b"abc", b"abc", b""),
        ("é".encode(), "é".encode(), b""),
        ("é".encode()[:1], b"", b"\xc3"),
        (b"a" + "你".encode()[:2], b"a", "你".encode()[:2]),
        ("🙂".encode()[:3], b"", "🙂".encode()[:3]),
        ("🙂".encode(), "🙂".encode(), b""),
        (b"ab\x80", b"ab\x80", b""),  # a stray continuation byte is not a pending character
    ],
)
def test_split_utf8(data: bytes, valid: bytes, pending: bytes) -> None:
    assert split_utf8(data) == (valid, pending)


def test_prefix_index_finds_exactly_the_strict_extensions() -> None:
    tokens = [b"a", b"ab", b"abc", b"abd", b"b", b"\xff", b"\xff\xff", b"\xffa", b"", b"ab"]
    special = [False] * len(tokens)
    special[9] = True  # a special token is never an extension
    index = PrefixIndex(tokens, special)
    assert sorted(index.extensions(b"ab").tolist()) == [2, 3]
    assert sorted(index.extensions(b"a").tolist()) == [1, 2, 3]
    assert sorted(index.extensions(b"\xff").tolist()) == [6, 7]
    assert index.extensions(b"abc").tolist() == []
    assert index.has_extension(b"ab") and not index.has_extension(b"abc")
    assert index.has_extension(b"\xff") and not index.has_extension(b"\xff\xff")
    brute = [i for i, t in enumerate(tokens) if not special[i] and t.startswith(b"a") and len(t) > 1]
    assert np.array_equal(np.sort(index.extensions(b"a")), brute)
