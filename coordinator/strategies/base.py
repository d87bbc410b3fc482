"""The interface every ensemble strategy implements: decide the next piece(s) of text.

A strategy gets a StepContext per step. It may ask models for their next-bytes distributions,
have one model draft tokens inside its worker, have models score a continuation in one pass, or
look up scores of candidate continuations, and answers with a Decision: pieces of text already
chosen (drafted tokens it accepts), then optionally a distribution the next token is drawn from.
A strategy object lives for one conversation, so it may keep state between steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from chorus_common.types import SamplingParams
from coordinator.strategies.settings import Problem, StrategySettings
from coordinator.union_dist import UnionDist

if TYPE_CHECKING:
    from coordinator.union_vocab import UnionVocab


class EnsembleView(Protocol):
    """The ensemble config as strategies see it (coordinator.config.EnsembleConfig is one; strategies
    do not import that module, which builds itself from their registry)."""

    @property
    def model_names(self) -> tuple[str, ...]: ...

    @property
    def primary_index(self) -> int | None: ...

    @property
    def defaults(self) -> Any: ...  # the request defaults: temperature, top_p, top_k ...

    def __getattr__(self, name: str) -> Any: ...  # each strategy's settings section, by its name


@dataclass(frozen=True)
class Drafted:
    pieces: list[bytes]  # one per token the model drew
    ended: bool  # it drew end of sequence after the pieces
    dists: list[UnionDist]  # with report_top_k: the distribution of each draw (the end draw included)


class StepContext(Protocol):
    """What a strategy may see and ask for during one step."""

    config: EnsembleView
    union: UnionVocab
    n_models: int
    weights: Sequence[float]  # normalised, per model
    primary: int | None
    threshold: float
    sampling: SamplingParams
    rng: np.random.Generator  # the request's seeded generator
    remaining: int  # tokens the request may still generate
    text: bytes  # the text generated so far
    alive: Sequence[bool]  # per model: its worker is still there (policy degrade)

    async def ask(self, models: Sequence[int], top_k: int | None = None, partial: bool = False) -> dict[int, UnionDist]:
        """The listed models' next-bytes distributions in the union, asked concurrently (top_k
        overrides the configured transport). `partial`: the text committed since may end inside a
        token (a character, not a token, was chosen), so each model's last token stays open. A model
        whose worker was lost (policy degrade) is missing from the answer; if no model is left at
        all, this raises."""
        ...

    async def draft(
        self, model: int, max_tokens: int, report_top_k: int = 0, after: Sequence[bytes] = ()
    ) -> Drafted | None:
        """Let one model draw up to max_tokens tokens itself with the request's sampling, after the
        text and then `after` (pieces assumed to follow, not committed yet); None if it was lost."""
        ...

    async def score(self, models: Sequence[int], pieces: list[bytes], top_k: int) -> dict[int, list[UnionDist | None]]:
        """Each model's top-k distribution before every piece and after the last, where the text
        there ends on one of its token boundaries (else None); one forward pass per model."""
        ...

    async def lookup(self, model: int, candidates: list[bytes]) -> np.ndarray | None:
        """Log-probabilities (under the model's last asked distribution) of each candidate's first
        token in the model's own spelling; b"" is end of sequence. None if the worker was lost."""
        ...

    def mix(self, answers: Mapping[int, UnionDist]) -> UnionDist:
        """The weighted average of the answering models' distributions."""
        ...

    def uid(self, data: bytes) -> int:
        """The union id of these bytes (b"" = end of sequence) for this step."""
        ...

    def bytes_of(self, uid: int) -> bytes: ...


@dataclass(frozen=True)
class Decision:
    dist: UnionDist | None = None  # what the next token is drawn from, after the pieces
    ensembled: bool = False  # more than one model decided `dist`
    pieces: tuple[bytes, ...] = ()  # tokens already chosen (e.g. a model's accepted draft)
    end: bool = False  # end of sequence after the pieces
    # Models that take the pieces as their own tokens, not holding them yet (SAFE in lockstep: the drafter,
    # whose most likely token they are, and each model that gave them a GaC author's share); the others
    # take them as text others wrote. Empty: the pieces were drawn inside a worker that holds them already.
    authors: frozenset[int] = frozenset()


class Strategy(ABC):
    name: ClassVar[str]
    needs_primary: ClassVar[bool] = False
    # It accepts tokens a model drew inside its worker (Decision.pieces), not drawn from a distribution
    # the coordinator has: such strategies cannot report logprobs.
    drafts: ClassVar[bool] = False
    # Its section of the config file, named after it (`safe:`); None = it has no settings.
    Settings: ClassVar[type[StrategySettings] | None] = None

    @classmethod
    def check(cls, sampling: SamplingParams) -> None:
        """Refuse sampling settings this strategy cannot honour (ValueError naming the field)."""
        return None

    @classmethod
    def check_settings(cls, config: EnsembleView) -> list[Problem]:
        """Problems of its section against the rest of the config (e.g. a model it names). Checked
        whichever strategy is configured: a request may ask for any."""
        return []

    @classmethod
    def check_configured(cls, config: EnsembleView) -> list[Problem]:
        """Problems with it as the configured strategy: a primary model it needs, request defaults it refuses."""
        problems: list[Problem] = []
        if cls.needs_primary and config.primary_index is None:
            msg = f"{cls.name!r} needs exactly one model with priority 'primary' (found none)"
            problems.append((("strategy",), msg))
        d = config.defaults
        try:
            cls.check(SamplingParams(d.temperature, d.top_p, d.top_k))
        except ValueError as exc:
            field, _, message = str(exc).partition(": ")
            problems.append((("defaults", field), message))
        return problems

    @abstractmethod
    async def step(self, ctx: StepContext) -> Decision: ...

    async def close(self) -> None:
        """The conversation is over (finished, failed or cancelled): stop any work still running."""
        return None
