"""Fuzzing the request handler: any request is either accepted or refused with a field-naming error."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from chorus.v1 import common_pb2, coordinator_pb2
from coordinator.config import parse_config
from coordinator.convert import InvalidRequest, requests_from_proto
from tests.cluster_helpers import ROOT

CONFIG = parse_config({"models": [{"name": "a", "path": "x"}, {"name": "b", "path": "y", "priority": "primary"}]}, ROOT)
FIELDS = (
    "prompt",
    "messages",
    "batch",
    "input",
    "max_new_tokens",
    "strategy",
    "temperature",
    "top_p",
    "threshold",
    "stop",
    "conversations",
    "role",
    "on_worker_loss",
)

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
messages = st.lists(st.tuples(st.sampled_from(["user", "system", "assistant", "", "bot"]), st.text(max_size=20)))


@st.composite
def requests(draw: st.DrawFn) -> coordinator_pb2.GenerateRequest:
    request = coordinator_pb2.GenerateRequest(
        strategy=draw(st.sampled_from(["", "gac", "threshold", "nope"])),
        stop=draw(st.lists(st.text(max_size=5), max_size=20)),
        on_worker_loss=draw(st.sampled_from(["", "fail", "degrade", "retry"])),
    )
    kind = draw(st.sampled_from(["prompt", "messages", "batch", "none"]))
    if kind == "prompt":
        request.prompt = draw(st.text(max_size=50))
    elif kind == "messages":
        request.messages.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in draw(messages))
    elif kind == "batch":
        for conversation in draw(st.lists(messages, max_size=70)):
            request.batch.conversations.add().messages.extend(
                common_pb2.ChatMessage(role=r, content=c) for r, c in conversation
            )
    for name in ("temperature", "top_p", "threshold"):
        if draw(st.booleans()):
            setattr(request, name, draw(floats))
    if draw(st.booleans()):
        request.max_new_tokens = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        request.top_k = draw(st.integers(0, 2**32 - 1))
    return request


@settings(max_examples=400, deadline=None, database=None)
@given(requests())
def test_requests_are_accepted_or_refused_naming_a_field(request: coordinator_pb2.GenerateRequest) -> None:
    try:
        accepted = requests_from_proto(request, CONFIG)
    except InvalidRequest as exc:
        assert any(field in str(exc) for field in FIELDS), str(exc)
        return
    for r in accepted:
        assert 1 <= r.max_new_tokens <= CONFIG.limits.max_new_tokens
        assert math.isfinite(r.sampling.temperature) and r.sampling.temperature >= 0
        assert 0 < r.sampling.top_p <= 1 and math.isfinite(r.threshold)
        assert all(r.stop) and r.on_worker_loss in ("fail", "degrade")
