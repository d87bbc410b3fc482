"""Which tokens the next forward pass runs: every waiting decode, then prefill chunks of as many sessions
as the token budget allows (SGLang's and vLLM's chunked-prefill rule), each with its KV blocks reserved; and,
for `--decode-stretch`, what a pass's two parts cost (PassCosts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from model_worker.conditioning import Branch
from model_worker.kv_manager import SessionKV


@dataclass
class PassStats:
    tokens_fed: int  # tokens this feed ran through the model (prefix-cache hits not counted)
    batch_size: int  # sessions in the (last) pass this feed rode in
    queue_ms: float  # from arrival to its first pass
    compute_ms: float  # in its passes
    queue_position: int  # feeds waiting ahead of it when it arrived


@dataclass
class Feed:
    """One session's tokens to append to its cache (over several passes when it is a prompt)."""

    kv: SessionKV
    ids: list[int]
    want: set[int]  # absolute positions whose output rows are wanted
    future: asyncio.Future[PassStats]
    position: int
    queued_at: float = field(default_factory=time.perf_counter)
    done: int = 0  # tokens of ids already in the cache (run, or taken from the prefix cache)
    cached: int = 0  # of which taken from the prefix cache
    admitted: bool = False  # looked up in the prefix cache
    started_at: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0
    # rows after other tokens in place of those fed from a position on (conditioning.Branch)
    branches: tuple[Branch, ...] = ()

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done


@dataclass(frozen=True)
class Slice:
    """The part of a feed one pass runs: tokens ids[done : done + n], starting at cache position `start`."""

    feed: Feed
    tokens: list[int]
    start: int
    want: list[int]  # wanted positions inside this slice
    branches: tuple[Branch, ...] = ()  # the feed's branches at positions inside this slice


# Feeds of at most this many tokens (decodes, a few re-tokenized tokens) go first in every pass.
SHORT = 8


def plan_round(
    waiting: list[Feed],
    max_tokens: int,
    chunk: int,
    reserve: Callable[[Feed, int], bool],
) -> list[Slice]:
    """The slices of one pass: short feeds first, then longer ones in arrival order, at most `chunk` tokens
    of each, until the pass holds `max_tokens`. `reserve(feed, n)` makes room in the KV cache for n more
    tokens of the feed, or says it cannot (the feed then waits for a later pass)."""
    slices: list[Slice] = []
    budget = max_tokens
    for feed in sorted(waiting, key=lambda f: (f.remaining > SHORT, f.queued_at)):
        n = min(feed.remaining, chunk, budget)
        if n <= 0 or not reserve(feed, n):
            continue
        start = len(feed.kv.ids)
        tokens = feed.ids[feed.done : feed.done + n]
        want = sorted(p for p in feed.want if start <= p < start + n)
        slices.append(Slice(feed, tokens, start, want, tuple(b for b in feed.branches if start <= b[0] < start + n)))
        budget -= n
    return slices


class PassCosts:
    """Running estimates of a pass's two parts, from the passes run: the seconds its decodes (feeds of at most
    SHORT tokens) take together, with how many there were, and the seconds per prompt token. A pass of one part
    times that part; a pass of both, the part it spent most on (the other at its estimate taken off), once one
    part is known."""

    WEIGHT = 0.3  # of the newest pass in each running mean

    def __init__(self) -> None:
        self.decodes_s: float | None = None
        self.decodes = 0.0  # the decodes in the passes that timed decodes_s (their running mean)
        self.prompt_token_s: float | None = None

    def observe(self, seconds: float, decodes: int, prompt_tokens: int) -> None:
        decodes_s, token_s = self.decodes_s, self.prompt_token_s
        if not prompt_tokens:
            if decodes:
                self._decodes_took(seconds, decodes)
        elif not decodes:
            self.prompt_token_s = self._mean(token_s, seconds / prompt_tokens)
        elif token_s is not None and (decodes_s is None or decodes_s >= prompt_tokens * token_s):
            self._decodes_took(max(seconds - prompt_tokens * token_s, 0.0), decodes)
        elif decodes_s is not None:
            self.prompt_token_s = self._mean(token_s, max(seconds - decodes_s, 0.0) / prompt_tokens)

    def prompt_budget(self, stretch: float, decodes: int, sessions: int) -> int | None:
        """Prompt tokens a pass with `decodes` decodes may add, of `sessions` feeds waiting in all: as many as
        keep it within `stretch` times a pass of every waiting session's decode (what their writing will take
        once all of them write: a bare pass of them is what a burst's gaps are held to). None while a prompt token's
        cost is unknown (no cap: the pass's prompt chunks time it); none at all while the decodes' time is
        unknown (a pass of decodes alone times them: while prompts wait, no other pass would); else at least
        one, so a prompt always advances."""
        if self.decodes_s is None:
            return 0
        if not self.prompt_token_s:
            return None
        ceiling = stretch * self.decodes_time(max(sessions, decodes))
        return max(1, int((ceiling - self.decodes_time(decodes)) / self.prompt_token_s))

    def decodes_time(self, decodes: int) -> float:
        """Seconds a pass of `decodes` decodes takes: the measured time, each decode more or fewer at a prompt
        token's cost (one more row through the same weights; a decode row's attention over its context makes
        it dearer, so the estimate errs low and the cap on the safe side)."""
        assert self.decodes_s is not None and self.prompt_token_s is not None
        return max(self.decodes_s + (decodes - self.decodes) * self.prompt_token_s, 0.0)

    def _decodes_took(self, seconds: float, decodes: int) -> None:
        self.decodes = self._mean(None if self.decodes_s is None else self.decodes, decodes)
        self.decodes_s = self._mean(self.decodes_s, seconds)

    def _mean(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.WEIGHT) * old + self.WEIGHT * new
