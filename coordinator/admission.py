"""Admission control shared by every front end (gRPC, HTTP): bounded work, and draining."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Overloaded(Exception):
    """At capacity: the client should back off and retry (RESOURCE_EXHAUSTED, HTTP 429)."""


class Draining(Exception):
    """This coordinator is shutting down: retry on another (UNAVAILABLE, HTTP 503)."""


class Admission:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.running = 0  # conversations being generated: bounded, so overload cannot grow memory
        self.draining = False

    @contextmanager
    def admit(self, conversations: int) -> Iterator[None]:
        if self.draining:
            raise Draining("this coordinator is shutting down; retry on another")
        if self.running + conversations > self.capacity:
            raise Overloaded(f"at capacity: {self.running} of {self.capacity} conversations running; retry later")
        self.running += conversations
        try:
            yield
        finally:
            self.running -= conversations
