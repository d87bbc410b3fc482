"""What a model conditions on: its own canonical tokenization of the text, with token healing.

The committed text may end inside one of the model's tokens (another model chose the bytes).
Then the model's distribution over the next *bytes* is exact when written as two parts
(DESIGN.md): tokens that extend the partial last token b, scored before b, and — weighted by
P(b) — the ordinary next-token distribution after b.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

import numpy as np


def split_utf8(data: bytes) -> tuple[bytes, bytes]:
    """Split off a trailing incomplete UTF-8 sequence (at most 3 bytes)."""
    for back in range(1, min(3, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 != 0x80:  # not a continuation byte: the start of the last character
            need = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4
            if lead >= 0x80 and need > back:
                return data[:-back], data[-back:]
            return data, b""
    return data, b""


@dataclass(frozen=True)
class Plan:
    """Tokens to condition on and how to read the distribution after them."""

    ids: list[int]
    # Committed bytes after the last complete character: every next token must start with them.
    pending: bytes
    # bytes(last token) + pending, when the last token may be extended (token healing).
    heal_prefix: bytes | None

    @property
    def rows_needed(self) -> tuple[int, ...]:
        """Positions whose output distribution the step needs."""
        n = len(self.ids)
        return (n - 2, n - 1) if self.heal_prefix is not None else (n - 1,)


class PrefixIndex:
    """Finds the tokens whose bytes start with a given prefix, in O(log V + matches)."""

    def __init__(self, tokens: list[bytes], special: list[bool]) -> None:
        order = sorted((b, i) for i, b in enumerate(tokens) if b and not special[i])
        self._keys = [b for b, _ in order]
        self._ids = np.fromiter((i for _, i in order), dtype=np.int64, count=len(order))
        self._lengths = np.fromiter((len(b) for b, _ in order), dtype=np.int64, count=len(order))

    def extensions(self, prefix: bytes) -> np.ndarray:
        """Ids of the tokens strictly longer than prefix that start with it."""
        lo = bisect_left(self._keys, prefix)
        upper = _successor(prefix)
        hi = len(self._keys) if upper is None else bisect_left(self._keys, upper, lo)
        lengths = self._lengths[lo:hi]
        return self._ids[lo:hi][lengths > len(prefix)]

    def has_extension(self, prefix: bytes) -> bool:
        # Several tokens may share the prefix's exact bytes (a byte-fallback token and a piece).
        after = bisect_right(self._keys, prefix)
        return after < len(self._keys) and self._keys[after].startswith(prefix)


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string that starts with prefix, if any."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class Conditioner:
    """Turns prompt + committed bytes into a Plan for one model's tokenizer."""

    def __init__(self, tokenizer: Any, tokens: list[bytes], special: list[bool]) -> None:
        self._tokenizer = tokenizer
        self._tokens = tokens
        self._special = special
        self.index = PrefixIndex(tokens, special)
        self.ids_by_bytes: dict[bytes, list[int]] = {}  # text tokens by their exact bytes
        for i, b in enumerate(tokens):
            if b and not special[i]:
                self.ids_by_bytes.setdefault(b, []).append(i)
        self._byte_ids: dict[int, int] = {}
        for i, b in enumerate(tokens):
            if len(b) == 1 and not special[i]:
                self._byte_ids.setdefault(b[0], i)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def plan(self, prompt: str, add_special_tokens: bool, generated: bytes) -> Plan:
        valid, pending = split_utf8(generated)
        # Invalid UTF-8 inside committed text cannot be tokenized as text; it is replaced.
        text = prompt + valid.decode("utf-8", errors="replace")
        text_bytes = text.encode("utf-8") + pending
        ids = self.encode(text, add_special_tokens)
        if pending and all(b in self._byte_ids for b in pending):
            # A split character is spelled with single-byte tokens (byte-level BPE, byte fallback).
            ids += [self._byte_ids[b] for b in pending]
            pending = b""
        heal = None
        if len(ids) >= 2 and not self._special[ids[-1]]:
            last = self._tokens[ids[-1]]
            # The last token must stand for the text's own tail (SentencePiece may add a dummy
            # prefix space to a first token, which is not in the text).
            if last and text_bytes[: len(text_bytes) - len(pending)].endswith(last):
                prefix = last + pending
                if pending or self.index.has_extension(prefix):
                    heal = prefix
        return Plan(ids=ids, pending=pending, heal_prefix=heal)
