"""Ensemble strategies, one module each, by name: a new strategy is a module here (its Strategy, its
Settings and rules) added to STRATEGIES, plus its values in the Helm chart (`make chart-schema`)."""

from coordinator.strategies.base import Decision, Drafted, EnsembleView, StepContext, Strategy
from coordinator.strategies.chared import Chared
from coordinator.strategies.gac import Gac
from coordinator.strategies.me import Me
from coordinator.strategies.safe import Safe
from coordinator.strategies.settings import StrategySettings
from coordinator.strategies.threshold import Threshold
from coordinator.strategies.unite import Unite

# The one list of strategies: the config's `strategy` and its sections, the chart's schema and the
# API's strategy names all come from it.
STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Gac, Threshold, Me, Unite, Safe, Chared)}
# Each strategy's section of the config file, named after it, where it has settings.
SECTIONS: dict[str, type[StrategySettings]] = {
    name: cls.Settings for name, cls in STRATEGIES.items() if cls.Settings is not None
}

__all__ = [
    "SECTIONS",
    "STRATEGIES",
    "Decision",
    "Drafted",
    "EnsembleView",
    "StepContext",
    "Strategy",
    "StrategySettings",
]
