"""Ensemble strategies, one module each, by name."""

from coordinator.strategies.base import Decision, StepContext, Strategy
from coordinator.strategies.gac import Gac
from coordinator.strategies.threshold import Threshold

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Gac, Threshold)}

__all__ = ["STRATEGIES", "Decision", "StepContext", "Strategy"]
