"""Test helpers for model_worker.conditioning's plans."""

from __future__ import annotations

from model_worker.conditioning import Plan


def plan_ids(plan: Plan) -> list[int]:
    """Every token a plan conditions on (a copy: O(text), which production steps never pay)."""
    return plan.suffix(0)
