"""Ensemble strategies, one module each, by name."""

from coordinator.strategies.base import Decision, Drafted, StepContext, Strategy
from coordinator.strategies.chared import Chared
from coordinator.strategies.gac import Gac
from coordinator.strategies.me import Me
from coordinator.strategies.safe import Safe
from coordinator.strategies.threshold import Threshold
from coordinator.strategies.unite import Unite

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Gac, Threshold, Me, Unite, Safe, Chared)}

__all__ = ["STRATEGIES", "Decision", "Drafted", "StepContext", "Strategy"]
