"""Running a request's conversations, the same for every front end (gRPC, OpenAI, GaC): admit them, generate
them, and close the generation however the front end stops reading. What a failure is answered with is
the table in failures.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

from coordinator.admission import Admission
from coordinator.ensemble import Ensemble
from coordinator.generation import generate_many
from coordinator.types import Finished, GenerationRequest, TextPiece


async def run_requests(
    ensemble: Ensemble, admission: Admission, requests: list[GenerationRequest], timeout: float | None = None
) -> AsyncIterator[tuple[int, TextPiece | Finished]]:
    """(conversation index, event) as the conversations generate. Admitted on the first read (Draining,
    Overloaded raise then); closing this iterator (aclose, which the caller owes it) cancels the workers'
    sessions and frees the admission. timeout: the workers' sessions' deadline (deadlines do not propagate)."""
    with admission.admit(len(requests)):
        events = generate_many(ensemble, requests, timeout)
        try:
            async for item in events:
                yield item
        finally:
            await events.aclose()
