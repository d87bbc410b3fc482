"""The union vocabulary: one entry per distinct byte string any model can emit, plus one pooled END.

Entries are keyed by *bytes*, never by token strings: GPT-2's 'Ã©', Llama's '▁é' minus its space and
``<0xC3><0xA9>`` are different strings, and only as bytes do the models agree on what they would
write. Every model's end-of-sequence tokens pool into END, so "stop" is one outcome the ensemble
can vote for; other special tokens (BOS, pad, chat markers) are not text and get no entry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

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
        self._dense: list[DenseMap | None] = [None] * len(index)
        self._tails: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # the latest TAIL_TABLES used

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

    @cached_property
    def first_chars(self) -> tuple[np.ndarray, list[bytes]]:
        """Each entry's first character as a key id, and the keys' bytes (END's key is b"").

        Computed once per union, for strategies that decide character by character.
        """
        keys: dict[bytes, int] = {}
        ids = np.fromiter((keys.setdefault(first_char(b), len(keys)) for b in self._bytes), np.int64, self.size)
        return ids, list(keys)

    def _model_of(self, index: np.ndarray) -> int | None:
        return next((m for m, own in enumerate(self.index) if own is index), None)

    def dense_map(self, index: np.ndarray) -> DenseMap | None:
        """The (cached) DenseMap of a model whose index array this is; None for an array not in self.index."""
        m = self._model_of(index)
        if m is None:
            return None
        found = self._dense[m]
        if found is None:
            found = self._dense[m] = DenseMap(index)
        return found

    def tail_ids(self, index: np.ndarray, tokens: list[bytes], skip: int, ids: np.ndarray) -> np.ndarray | None:
        """Union ids of tokens[i][skip:] for these token ids of the model whose index array this is (-1 where
        those bytes are no union entry), in a new array; None for an array not in self.index.

        A model whose last token stays open sends the tokens extending it with their first `skip` bytes
        already written: for a short open prefix such as a space that is a large part of its vocabulary,
        so each token's tail is looked up once per (model, skip) and kept, in a table as long as the
        vocabulary; only the TAIL_TABLES used last are kept (short skips, a space or two, come back all the
        time; every longer one would otherwise hold its megabyte for the coordinator's lifetime)."""
        m = self._model_of(index)
        if m is None:
            return None
        known = self._tails.get((m, skip))
        if known is None:
            known = self._tails[(m, skip)] = np.full(index.size, _UNKNOWN, dtype=np.int32)
            if len(self._tails) > TAIL_TABLES:
                self._tails.popitem(last=False)
        else:
            self._tails.move_to_end((m, skip))
        found = known[ids].astype(np.int64)
        unknown = found == _UNKNOWN
        if unknown.any():
            missing = ids[unknown]
            get = self._ids.get
            looked = np.fromiter((get(tokens[i][skip:], -1) for i in missing.tolist()), np.int64, missing.size)
            known[missing] = looked
            found[unknown] = looked
        return found


MAX_RANKS = 8  # DenseMap.more holds at most this many ranks
TAIL_TABLES = 16  # (model, skip) tables of tail_ids kept: 1 MiB each for Gemma 3's 262,144 tokens
_UNKNOWN = -2  # a tail not looked up yet (tail_ids)


class DenseMap:
    """Where a dense distribution over one model's vocabulary lands in the union, computed once.

    uids are the sorted distinct union ids of the model's text tokens; first[j] is the lowest token id
    mapping to uids[j]; more[r - 1] lists (slots, token ids) of the r-th further token of each union id
    that several tokens map to (identical bytes, several EOS ids), or, past MAX_RANKS such tokens, grouped
    has every token's (slot, token id) ordered by slot then token id. Every array is read-only.
    """

    def __init__(self, index: np.ndarray) -> None:
        ids = np.flatnonzero(index >= 0)
        uids = index[ids]
        order = np.argsort(uids, kind="stable")  # by union id, then token id
        ids, uids = ids[order], uids[order]
        new = np.ones(uids.size, dtype=bool)
        new[1:] = uids[1:] != uids[:-1]
        starts = np.flatnonzero(new)
        slot = np.cumsum(new) - 1
        rank = np.arange(uids.size) - starts[slot]
        self.size = int(index.size)
        self.uids: np.ndarray = _frozen(uids[starts].astype(np.int64))
        self.first: np.ndarray = _frozen(ids[starts])
        ranks = int(rank.max(initial=0))
        self.more: list[tuple[np.ndarray, np.ndarray]] = []
        self.grouped: tuple[np.ndarray, np.ndarray] | None = None  # (slot, token id) of every token, by slot
        if ranks <= MAX_RANKS:
            self.more = [(_frozen(slot[rank == r]), _frozen(ids[rank == r])) for r in range(1, ranks + 1)]
        else:  # many tokens share a union id: one bincount beats a pass per rank
            self.grouped = (_frozen(slot), _frozen(ids))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def first_char(data: bytes) -> bytes:
    """The first UTF-8 character of data (fewer bytes if data ends inside it; one byte if invalid)."""
    if not data:
        return b""
    lead = data[0]
    need = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4 if lead < 0xF8 else 1
    return data[:need]
