"""The interface every ensemble strategy implements: decide one step's distribution."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from coordinator.union_dist import UnionDist


class StepContext(Protocol):
    """What a strategy may ask for during one step."""

    n_models: int
    weights: Sequence[float]  # normalised, per model
    primary: int | None
    threshold: float

    async def ask(self, models: Sequence[int]) -> list[UnionDist]:
        """Each listed model's next-bytes distribution in the union (concurrently)."""
        ...

    def mix(self, dists: Sequence[UnionDist], models: Sequence[int]) -> UnionDist:
        """The weighted average of the listed models' distributions."""
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
