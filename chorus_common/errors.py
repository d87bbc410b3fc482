"""Failures both sides of the worker API name the same way."""

from __future__ import annotations


class ContextFull(ValueError):
    """The text no longer fits a model's context. The session stays open (a rollback brings it back
    within it). A worker's runtime raises it and its server answers `context_full`; the coordinator's
    session raises it on that answer, and the generation ends with finish reason 'length'."""
