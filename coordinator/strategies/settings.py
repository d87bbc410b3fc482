"""What a strategy's settings section is built from; shared with coordinator.config, which imports it
(never the other way round: strategies do not import the config module).

A strategy's `Settings` is its section of the config file (`unite:`, `safe:` ...), named after it.
A field that holds a model's name is marked with NAMES_A_MODEL, so the Helm chart types it as one.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

Loc = tuple[int | str, ...]  # a key path in the user's file: ("safe", "drafter"), ("models", 1, "score")
Problem = tuple[Loc, str]

NAMES_A_MODEL: dict[str, Any] = {"namesModel": True}  # json_schema_extra of a field naming a member


class Section(BaseModel):
    """A config section: typed strictly, closed (unknown keys are errors), immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class StrategySettings(Section):
    """A strategy's own section; a Field's description says what the setting does (the chart shows it)."""

    def alone(self) -> StrategySettings:
        """These settings for one member served alone (settings naming another member drop it)."""
        return self
