"""The interface every ensemble strategy implements: decide one step's distribution."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from coordinator.union_dist import UnionDist


class StepContext(Protocol):
    """What a strategy may ask for during one step."""

    n_models: int
    weights: Sequence[float]  # normalised, per model
    primary: int | None
    threshold: float

    async def ask(self, models: Sequence[int]) -> dict[int, UnionDist]:
        """The listed models' next-bytes distributions in the union, asked concurrently.

        A model whose worker was lost (policy degrade) is missing from the answer; if no model is
        left at all, this raises.
        """
        ...

    def mix(self, answers: Mapping[int, UnionDist]) -> UnionDist:
        """The weighted average of the answering models' distributions."""
        ...


@dataclass(frozen=True)
class Decision:
    dist: UnionDist  # what the next union entry is drawn from
    ensembled: bool  # more than one model decided this step


class Strategy(ABC):
    name: ClassVar[str]
    needs_primary: ClassVar[bool] = False

    @abstractmethod
    async def step(self, ctx: StepContext) -> Decision: ...
