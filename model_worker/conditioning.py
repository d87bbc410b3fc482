"""What a model conditions on: its own tokens, and the committed bytes after them (README.md, "How it works").

The rules, in order:
- the prompt is tokenized canonically, once; generation starts at a token boundary after it (the
  prompt's last token is never healed);
- a committed piece that is one of the model's own tokens at its boundary is appended as that token:
  the text is then at the model's boundary again, and no extension mass is added;
- other committed text (other models' pieces) forms the *tail*: it is tokenized canonically in
  context (only the tail, so the cost of a step does not grow with the text), and its last token may
  be extended by what comes next (token healing, exact: see distribution.py). A trailing incomplete
  UTF-8 character is spelt with the model's tokens, longest first (a byte-level BPE writes an emoji as
  two or three tokens, a byte-fallback one as byte pieces), and every token that holds part of the last
  character stays open to extension, so no spelling of it is lost; bytes no token spells stay pending
  (the next token must start with them);
- the tail's complete words are settled (appended to the model's tokens): tokenizers do not merge
  across the whitespace that starts a word, so only the last word can still change. A tail without
  whitespace (CJK, long identifiers) keeps its last KEEP_OPEN tokens open once it passes MAX_OPEN;
- a tail that ends in a run of whitespace the tokenizer spells differently before a word (byte-level BPE
  writes b"    " at the end of a text but b"   " + b" return" in code, b"\n\n" but b"\n" + b"\n" + b"def")
  is read in both spellings: the run as it ends the text, and as it goes on before a word (Plan.alt; the
  worker computes the rows of that spelling as a branch of the same pass, model_runner.py).
"""

from __future__ import annotations

import contextlib
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A tail of more than MAX_OPEN tokens without a word start keeps its last KEEP_OPEN tokens open.
MAX_OPEN = 32
KEEP_OPEN = 8
_WORD_START = b" \t\n\r"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Bytes of the tokens before the tail that are re-encoded with it, as its left context.
ANCHOR_TOKENS = 4
# The most tokens an alternative spelling of a whitespace run may take (Plan.alt).
ALT_TOKENS = 4


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
class Alt:
    """The other spelling of a whitespace run that ends the text: `tokens` in place of the last token, and
    `rest`, the run's last bytes, which the next token must start with (b"   " then b" " for b"    ", or
    b"\n", b"\n" then b"" for b"\n\n")."""

    tokens: tuple[int, ...]
    rest: bytes


# A branch: the output row after `tokens` placed from `position` on, in place of what the cache holds there.
Branch = tuple[int, tuple[int, ...]]  # (position, tokens)


def branch_rows(branch: Branch) -> list[Branch]:
    """The rows a branch gives: after each of its tokens."""
    at, tokens = branch
    return [(at, tokens[: i + 1]) for i in range(len(tokens))]


@dataclass(frozen=True)
class Plan:
    """Tokens to condition on and how to read the distribution after them.

    The tokens are the first n_fixed of the session's settled tokens (the list itself, not a copy: a
    step's cost must not grow with the text) followed by `extra`, the open tail's tokens."""

    fixed: list[int]
    n_fixed: int
    extra: tuple[int, ...]
    # Committed bytes after the last token: every next token must start with them.
    pending: bytes
    # Open tokens, the last ones (all in `extra`): a token drawn in place of the last k of them may extend
    # their bytes and the pending ones (token healing). levels[j] holds those bytes for k = len(levels) - j:
    # one level, or several where a character is split over tokens.
    levels: tuple[bytes, ...] = ()
    # The text ends inside a character: the next token must continue it (not end the text, nor start another).
    inside: bool = False
    # The text ends in a whitespace run spelt otherwise before a word: its last token is open, and the
    # distribution also counts that spelling (its tokens from the last token's position on: `branch`).
    alt: Alt | None = None

    def __len__(self) -> int:
        return self.n_fixed + len(self.extra)

    @property
    def last(self) -> int:
        return self.extra[-1] if self.extra else self.fixed[self.n_fixed - 1]

    def suffix(self, start: int) -> list[int]:
        """The tokens from position `start` on."""
        if start >= self.n_fixed:
            return list(self.extra[start - self.n_fixed :])
        return self.fixed[start : self.n_fixed] + list(self.extra)

    def is_prefix_of(self, other: Plan) -> bool:
        """Its tokens begin other's (plans of one session's text, whose settled tokens only grew between them)."""
        k = min(self.n_fixed, other.n_fixed)
        return len(self) <= len(other) and self.suffix(k) == other.suffix(k)[: len(self) - k]

    @property
    def open(self) -> int:
        return len(self.levels)

    @property
    def heal_prefix(self) -> bytes | None:
        """The committed bytes from the first open token on (None if no token is open)."""
        return self.levels[0] if self.levels else None

    @property
    def rows_needed(self) -> tuple[int, ...]:
        """Positions whose output distribution the step needs: after the last token, and before each open one."""
        n = len(self)
        return tuple(range(n - 1 - self.open, n))

    @property
    def branch(self) -> Branch | None:
        """The branch the alternative spelling needs: its tokens from the last token's position on."""
        return None if self.alt is None else (len(self) - 1, self.alt.tokens)

    @property
    def at_boundary(self) -> bool:
        """The text ends where one of the model's tokens ends."""
        return not self.pending


@dataclass
class TextState:
    """One session's text as its model sees it."""

    fixed: list[int]  # the prompt's tokens, then the settled tokens of the generated text
    prompt_len: int
    generated: bytearray = field(default_factory=bytearray)  # every committed byte after the prompt
    ends: list[int] = field(default_factory=list)  # where each settled generated token ends in `generated`
    # The fewest settled tokens held since the last mark(): a KV cache that held them then still does.
    low_water: int = 0
    _tail_cache: tuple[bytes, list[int], list[int]] | None = None

    @property
    def settled(self) -> int:
        return self.ends[-1] if self.ends else 0

    @property
    def tail(self) -> bytes:
        return bytes(self.generated[self.settled :])

    def copy(self) -> TextState:
        return TextState(
            list(self.fixed),
            self.prompt_len,
            bytearray(self.generated),
            list(self.ends),
            self.low_water,
            self._tail_cache,
        )

    def mark(self) -> None:
        """A KV cache now holds (at least) the settled tokens' prefix it overlaps."""
        self.low_water = len(self.fixed)

    def settle(self, ids: list[int], lengths: list[int]) -> None:
        """Append tokens standing for the next sum(lengths) bytes of the tail."""
        at = self.settled
        for i, n in zip(ids, lengths, strict=True):
            at += n
            self.fixed.append(i)
            self.ends.append(at)
        self._tail_cache = None


class PrefixIndex:
    """Finds the tokens whose bytes start with a given prefix, in O(log V + matches)."""

    def __init__(self, tokens: list[bytes], special: list[bool]) -> None:
        order = sorted((b, i) for i, b in enumerate(tokens) if b and not special[i])
        self._keys = [b for b, _ in order]
        self._ids = np.fromiter((i for _, i in order), dtype=np.int64, count=len(order))
        self._lengths = np.fromiter((len(b) for b, _ in order), dtype=np.int64, count=len(order))
        # Tokens that begin with a UTF-8 continuation byte (0x80..0xBF): a contiguous run of the sorted keys.
        self.continuing: np.ndarray = self._ids[bisect_left(self._keys, b"\x80") : bisect_left(self._keys, b"\xc0")]

    @property
    def longest(self) -> int:
        """The most bytes a token holds (1 for an empty index)."""
        return int(self._lengths.max()) if self._lengths.size else 1

    def exact(self, data: bytes) -> list[int]:
        """Ids of the tokens whose bytes are exactly data, ascending."""
        keys = self._keys
        lo = bisect_left(keys, data)
        if lo == len(keys) or keys[lo] != data:
            return []
        if lo + 1 == len(keys) or keys[lo + 1] != data:  # nearly always: one token
            return [int(self._ids[lo])]
        return self._ids[lo : bisect_right(keys, data, lo)].tolist()

    def shared(self) -> Iterator[bytes]:
        """The byte strings that several tokens spell (a byte-fallback token and a piece)."""
        keys = self._keys
        return (keys[k] for k in range(1, len(keys)) if keys[k] == keys[k - 1] and (k < 2 or keys[k - 2] != keys[k]))

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


def _last_char_start(data: bytes) -> int:
    """Where the last UTF-8 character of data starts (complete or not; a stray byte is a character)."""
    for back in range(1, min(4, len(data)) + 1):
        if data[-back] & 0xC0 != 0x80:
            lead = data[-back]
            need = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4 if lead >> 3 == 30 else 1
            return len(data) - back if back <= need else len(data) - 1
    return len(data) - 1


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string that starts with prefix, if any."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class Conditioner:
    """One model's rules for turning committed bytes into its own tokens."""

    def __init__(
        self,
        tokenizer: Any,
        tokens: list[bytes],
        special: list[bool],
        settle: bool = True,
        anchor_tokens: int = ANCHOR_TOKENS,
    ) -> None:
        self._tokenizer = tokenizer
        self.settles = settle  # False: the whole tail stays open (a slow reference for tests)
        self.anchor_tokens = anchor_tokens
        self._tokens = tokens
        self._special = special
        self.index = PrefixIndex(tokens, special)
        # Text tokens are found by their exact bytes in the index (ids_of), and only the few byte strings several
        # tokens spell are kept here, ranked: a dict of every token's bytes to a list of its ids held 44 MB of
        # Python objects for Gemma 3's 262,144 tokens.
        self._ranked = {data: self._rank(data, self.index.exact(data)) for data in self.index.shared()}
        self._longest = self.index.longest
        self._alts: dict[int, Alt | None] = {}  # by whitespace token: how the tokenizer spells it before a word

    def _rank(self, data: bytes, ids: list[int]) -> list[int]:
        """Tokens with the same bytes (say a byte-fallback token and a piece): the one the tokenizer writes goes
        first, then pieces before byte-fallback tokens."""
        written: list[int] = []
        with contextlib.suppress(UnicodeDecodeError):
            written = self.encode(data.decode("utf-8"), add_special_tokens=False)
        pieces = self._tokenizer.convert_ids_to_tokens(ids)
        rank = {i: (written != [i], bool(_BYTE_PIECE.fullmatch(p or ""))) for i, p in zip(ids, pieces, strict=True)}
        return sorted(ids, key=rank.__getitem__)

    def ids_of(self, data: bytes) -> list[int]:
        """The text tokens whose bytes are exactly data, the one the tokenizer writes first; [] if none."""
        ranked = self._ranked.get(data)
        return list(ranked) if ranked is not None else self.index.exact(data)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def start(self, prompt: str, add_special_tokens: bool) -> TextState:
        ids = self.encode(prompt, add_special_tokens)
        return TextState(fixed=ids, prompt_len=len(ids))

    # -- moving the text ----------------------------------------------------------------------

    def commit(self, state: TextState, piece: bytes, boundary_row: Any = None, partial: bool = False) -> None:
        """Append committed bytes. At the model's boundary, a piece that is one of its tokens is that token
        (of several with the same bytes, the likeliest under boundary_row, the logits after the boundary,
        else the one the tokenizer writes),
        unless `partial`: the piece may end inside a token, so it joins the tail and stays open."""
        if not piece:
            return
        ids = self.ids_of(piece) if not state.tail and not partial else []
        state.generated += piece
        state._tail_cache = None
        if ids:
            best = ids[0] if boundary_row is None or len(ids) == 1 else max(ids, key=lambda i: float(boundary_row[i]))
            state.settle([best], [len(piece)])
            return
        toks, lengths, _ = self._tail_tokens(state)
        done = self._settled_prefix(toks)
        if done:
            state.settle(toks[:done], lengths[:done])

    def _settled_prefix(self, toks: list[int]) -> int:
        """How many of the tail's tokens can no longer change: those before its last word start."""
        if not self.settles:
            return 0
        for k in range(len(toks) - 1, 0, -1):
            first = self._tokens[toks[k]][:1]
            if first and first in _WORD_START:
                return k
        return len(toks) - KEEP_OPEN if len(toks) > MAX_OPEN else 0

    def commit_draw(self, state: TextState, plan: Plan, token: int, replaces: int, appended: bytes) -> None:
        """The model drew `token` itself from the state's current plan: after its last token (replaces 0), or
        in place of open tokens (a healing part). The plan's open tail and the token become the model's
        tokens, exactly."""
        assert plan.n_fixed == len(state.fixed), "a draw commits to the state its plan was made from"
        assert replaces >= 0, "a model draws after the text's own spelling (Runtime._draw)"
        state.generated += appended
        kept = len(plan.extra)
        if replaces:  # it replaces the open tokens whose bytes (and the pending ones) it extends
            skipped = len(self._tokens[token]) - len(appended)
            kept -= plan.open - [len(prefix) for prefix in plan.levels].index(skipped)
        new = [*plan.extra[:kept], token]
        state.settle(new, [len(self._tokens[i]) for i in new])

    def rollback(self, state: TextState, n: int) -> None:
        """Drop the last n committed bytes (a draft or scored continuation that was not accepted)."""
        keep = len(state.generated) - n
        while state.ends and state.ends[-1] > keep:
            state.ends.pop()
            state.fixed.pop()
        state.low_water = min(state.low_water, len(state.fixed))
        del state.generated[keep:]
        state._tail_cache = None

    # -- reading it ---------------------------------------------------------------------------

    def plan(self, state: TextState) -> Plan:
        tail = state.tail
        n = len(state.fixed)
        if not tail:
            return Plan(state.fixed, n, (), b"")
        toks, _, pending = self._tail_tokens(state)
        if pending:
            toks, pending = self._spell_pending(toks, pending)
        inside = bool(split_utf8(tail)[1])
        alt = self._alt(toks[-1]) if toks and not pending and n + len(toks) >= 2 else None
        levels = self._levels(toks, pending, tail, last_open=alt is not None)
        return Plan(state.fixed, n, tuple(toks), pending, levels, inside, alt)

    def _alt(self, token: int) -> Alt | None:
        """How the tokenizer spells a whitespace token that ends the text when a word follows, where that
        differs: its own answer for the run followed by a letter (at most ALT_TOKENS tokens before the word's)."""
        if token in self._alts:
            return self._alts[token]
        run = self._tokens[token]
        alt = None
        if len(run) >= 2 and run.isspace() and not self._special[token]:
            ids = self.encode(run.decode("ascii") + "a", add_special_tokens=False)
            spelt = [self._tokens[i] for i in ids]
            word = spelt[-1] if spelt else b""
            rest = word[:-1]
            if (
                b"".join(spelt) == run + b"a"
                and 1 <= len(ids) - 1 <= ALT_TOKENS
                and run.endswith(rest)
                and (ids[:-1], rest) != ([token], b"")
            ):
                alt = Alt(tuple(ids[:-1]), rest)
        self._alts[token] = alt
        return alt

    def _levels(self, toks: list[int], pending: bytes, tail: bytes, last_open: bool = False) -> tuple[bytes, ...]:
        """Which of the tail's last tokens are open (Plan.levels). The last one, where a token extends it (or
        bytes are pending). Where the text ends in a character of several bytes, every token that holds part
        of it, and the token before them if the character starts a token (b" " then b"\xf0\x9f" can be one
        token b" \xf0\x9f..."): back to the earliest that a token extends."""
        if not toks:
            return ()
        start = len(tail) - len(pending) - len(self._tokens[toks[-1]])  # where the last token starts
        depth = 1
        char = _last_char_start(tail)
        if tail[char] >= 0x80:  # a character of several bytes: the tokens that hold part of it
            while depth < len(toks) and start > char:
                depth += 1
                start -= len(self._tokens[toks[-depth]])
            if start == char and depth < len(toks):
                depth += 1
        levels: list[bytes] = []
        rest = pending
        for k in range(1, depth + 1):
            rest = self._tokens[toks[-k]] + rest
            levels.append(rest)
        opened = next((k for k in range(depth, 0, -1) if self.index.has_extension(levels[k - 1])), 0)
        if pending or last_open:  # an alternative spelling is weighed against the last token's probability
            opened = max(opened, 1)
        return tuple(reversed(levels[:opened]))

    def _spell_pending(self, toks: list[int], pending: bytes) -> tuple[list[int], bytes]:
        """The tail's tokens and pending bytes once the pending bytes (an incomplete character) are spelt with the
        model's tokens, longest first, together with the last token's bytes: a byte-level BPE writes a character
        as several tokens (b" \xf0\x9f", b"\xa4", b"\x96"), a byte-fallback one as byte pieces. Every token
        that holds part of the character stays open (_levels), so the tokens that extend it are counted too.
        Bytes no token spells (no byte fallback) stay pending."""
        last = self._tokens[toks[-1]] if toks else b""
        data = last + pending
        spelled: list[int] = []
        at = 0
        while at < len(data):
            longest = min(self._longest, len(data) - at)
            n, ids = next(((n, ids) for n in range(longest, 0, -1) if (ids := self.ids_of(data[at : at + n]))), (0, []))
            if not n:
                return toks, pending
            spelled.append(ids[0])
            at += n
        return [*toks[: len(toks) - bool(toks)], *spelled], b""

    def _tail_tokens(self, state: TextState) -> tuple[list[int], list[int], bytes]:
        """The tail's tokens in context, their byte lengths, and the trailing incomplete character."""
        tail = state.tail
        cached = state._tail_cache
        if cached is not None and cached[0] == tail:
            toks, lengths = cached[1], cached[2]
        else:
            valid, _ = split_utf8(tail)
            toks, lengths = self._encode_tail(state, valid)
            state._tail_cache = (tail, toks, lengths)
        return toks, lengths, tail[sum(lengths) :]

    def _encode_tail(self, state: TextState, valid: bytes) -> tuple[list[int], list[int]]:
        """Canonical tokens of `valid` after the model's tokens: re-encoded with the bytes of the last few
        tokens as left context (so merges and pre-tokenization see what precedes); in isolation if that
        splits differently; by longest match if the tokenizer will not spell the bytes exactly."""
        if not valid:
            return [], []
        try:
            text = valid.decode("utf-8")
        except UnicodeDecodeError:  # stray bytes inside committed text: no tokenizer input spells them
            return self._longest_match(valid)
        anchor = self._anchor(state)
        for context in (anchor, b"") if anchor else (b"",):
            ids = self.encode(context.decode("utf-8") + text, add_special_tokens=False)
            found = self._after(ids, valid)
            if found is not None:
                return found, [len(self._tokens[i]) for i in found]
        return self._longest_match(valid)

    def _anchor(self, state: TextState) -> bytes:
        anchor = b""
        for i in reversed(state.fixed[-self.anchor_tokens :]):
            if self._special[i]:
                break
            anchor = self._tokens[i] + anchor
        for skip in range(min(4, len(anchor)) + 1):
            try:
                anchor[skip:].decode("utf-8")
                return anchor[skip:]
            except UnicodeDecodeError:
                continue
        return b""

    def _after(self, ids: list[int], valid: bytes) -> list[int] | None:
        """The trailing tokens of ids that spell exactly `valid`, if a token boundary falls there."""
        total = 0
        for k in range(len(ids) - 1, -1, -1):
            total += len(self._tokens[ids[k]])
            if total == len(valid):
                toks = ids[k:]
                return toks if b"".join(self._tokens[i] for i in toks) == valid else None
            if total > len(valid):
                return None
        return None

    def _longest_match(self, data: bytes) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        lengths: list[int] = []
        at = 0
        while at < len(data):
            for n in range(min(self._longest, len(data) - at), 0, -1):
                match = self.ids_of(data[at : at + n])
                if match:
                    ids.append(match[0])
                    lengths.append(n)
                    at += n
                    break
            else:  # a byte no token spells (no byte fallback): the unknown token stands for it
                unk = getattr(self._tokenizer, "unk_token_id", None)
                if unk is None:
                    break
                ids.append(int(unk))
                lengths.append(1)
                at += 1
        return ids, lengths
