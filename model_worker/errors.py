"""The errors a worker's requests can meet, apart from the runtime that raises them: the server maps them to
gRPC statuses without importing the runtime, so a worker serves health checks before the modelling code is
imported (main.py: that import comes after the tokenizer is loaded)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request this worker cannot serve; the message names the field."""


class SessionExpired(Exception):
    """The session sat idle past the TTL and its KV cache was reclaimed (FAILED_PRECONDITION)."""


class AtCapacity(Exception):
    """The worker holds its maximum of sessions (RESOURCE_EXHAUSTED: retry later)."""
