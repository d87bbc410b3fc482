"""The union vocabulary: one entry per distinct byte string any model can emit, plus one pooled END.

Entries are keyed by *bytes*, never by token strings: GPT-2's 'Ã©', Llama's '▁é' minus its space and
``<0xC3><0xA9>`` are different strings, and only as bytes do the models agree on what they would
write. Every model's end-of-sequence tokens pool into END, so "stop" is one outcome the ensemble
can vote for; other special tokens (BOS, pad, chat markers) are not text and get no entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

END: int = 0  # union id of the pooled end-of-sequence entry
NOT_TEXT: int = -1  # index value of special (non-EOS) tokens: no union entry


@dataclass(frozen=True)
class ModelVocab:
    """One model's vocabulary as the worker reports it."""

    tokens: list[bytes]  # id -> exact bytes
    special: list[bool]  # id -> special flag
    eos_ids: frozenset[int]


class UnionVocab:
    """Union of the models' byte strings; ids are END, then new byte strings by (model order, token id)."""

    def __init__(self, vocabs: Sequence[ModelVocab]) -> None:
        ids: dict[bytes, int] = {}
        index: list[np.ndarray] = []
        for m, vocab in enumerate(vocabs):
            if len(vocab.tokens) != len(vocab.special):
                raise ValueError(f"model {m}: {len(vocab.tokens)} tokens but {len(vocab.special)} special flags")
            eos = vocab.eos_ids
            setdefault = ids.setdefault
            # A new byte string gets the next id; END (0) is not in the dict, hence the + 1.
            uids = [
                END if i in eos else NOT_TEXT if special or not data else setdefault(data, len(ids) + 1)
                for i, (data, special) in enumerate(zip(vocab.tokens, vocab.special, strict=True))
            ]
            index.append(np.array(uids, dtype=np.int64))
        self._ids = ids
        self._bytes: list[bytes] = [b"", *ids]  # dicts keep insertion order, which is id order
        self.index = index
        self.size: int = len(self._bytes)

    def bytes_of(self, uid: int) -> bytes:
        """The bytes of a union entry; END is b""."""
        if not 0 <= uid < self.size:
            raise IndexError(f"union id {uid} out of range [0, {self.size})")
        return self._bytes[uid]

    def lookup(self, b: bytes) -> int | None:
        """Union id of these exact bytes (non-special text), or None if no model has them as a token."""
        return self._ids.get(b)

    def is_end(self, uid: int) -> bool:
        return bool(uid == END)
