"""CharED, character-wise ensemble: models vote on the next character, not the next token.

Each model's next-token distribution gives a marginal over the next character (the mass of the
entries that start with it); the weighted average picks the character; each model's table is then
filtered to the entries that go on past that character, and it is asked again only when entries
that end at the character hold a noticeable share of its mass (their continuation is unknown
until the model runs; `chared.requery_mass`, 0 = always ask then, which is exact). Independent of
vocabularies: only bytes meet. A character split over byte tokens is a key of its own bytes.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from coordinator.strategies.base import Decision, StepContext, Strategy
from coordinator.strategies.settings import StrategySettings
from coordinator.union_dist import UnionDist
from coordinator.union_vocab import first_char

Table = dict[bytes, float]  # continuation bytes -> probability (b"" = end of sequence)


class CharedSettings(StrategySettings):
    requery_mass: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="re-ask a model when the tokens that end at the chosen character hold at least this share "
        "of its remaining mass (0 = always exact: re-ask whenever any does)",
    )


class Chared(Strategy):
    name = "chared"
    Settings = CharedSettings

    def __init__(self) -> None:
        self._tables: list[Table | None] = []
        self._mark = 0  # length of the text when the last character was decided

    async def step(self, ctx: StepContext) -> Decision:
        if not self._tables:
            self._tables = [None] * ctx.n_models
        else:
            self._advance(ctx.text[self._mark :], ctx.config.chared.requery_mass)
        need = [i for i, t in enumerate(self._tables) if t is None and ctx.alive[i]]
        marginals: dict[int, Table] = {}
        if need:
            for i, dist in (await ctx.ask(need, partial=True)).items():
                self._tables[i], marginals[i] = _table(ctx, dist)
        for i, table in enumerate(self._tables):
            if table is not None and ctx.alive[i] and i not in marginals:
                marginals[i] = _marginal(table)
        self._mark = len(ctx.text)
        total = sum(ctx.weights[i] for i in marginals)
        votes: Table = {}
        for i, marginal in marginals.items():
            mass = sum(marginal.values()) or 1.0
            for key, p in marginal.items():
                votes[key] = votes.get(key, 0.0) + ctx.weights[i] / total * p / mass
        uids = np.array([ctx.uid(k) for k in votes])
        order = np.argsort(uids)
        return Decision(UnionDist(uids[order], np.array(list(votes.values()))[order]), ensembled=len(marginals) > 1)

    def _advance(self, chosen: bytes, requery_mass: float) -> None:
        """Keep what goes on past the chosen character; re-ask where what ends at it weighs enough."""
        for i, table in enumerate(self._tables):
            if table is None:
                continue
            rest: Table = {}
            ended = 0.0
            for data, p in table.items():
                if len(data) > len(chosen) and data.startswith(chosen):
                    rest[data[len(chosen) :]] = rest.get(data[len(chosen) :], 0.0) + p
                elif data and chosen.startswith(data):
                    ended += p
            kept = sum(rest.values())
            requery = kept <= 0 or (ended > 0 and ended >= requery_mass * (kept + ended))
            self._tables[i] = None if requery else rest


def _table(ctx: StepContext, dist: UnionDist) -> tuple[Table, Table]:
    """A fresh distribution as a table of the entries with noticeable mass, and its marginal."""
    key_ids, keys = ctx.union.first_chars
    size = key_ids.size
    inside = dist.uids < size
    marginal: Table = {}
    counts = np.bincount(key_ids[dist.uids[inside]], weights=dist.probs[inside], minlength=len(keys))
    for k in np.flatnonzero(counts):
        marginal[keys[k]] = float(counts[k])
    for uid, p in zip(dist.uids[~inside], dist.probs[~inside], strict=True):
        key = first_char(ctx.bytes_of(int(uid)))
        marginal[key] = marginal.get(key, 0.0) + float(p)
    # Only entries that can matter are kept as bytes: the tail below 1e-6 of the mass is dropped.
    keep = np.flatnonzero(dist.probs > 1e-6 * dist.probs.sum())
    table = {ctx.bytes_of(int(dist.uids[k])): float(dist.probs[k]) for k in keep}
    return table, marginal


def _marginal(table: Table) -> Table:
    out: Table = {}
    for data, p in table.items():
        key = first_char(data)
        out[key] = out.get(key, 0.0) + p
    return out
