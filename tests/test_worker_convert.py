"""The worker's responses, built in place (model_worker/convert.py): each names its kind even when it carries
nothing else, and its distributions decode to what the runtime produced."""

from __future__ import annotations

import numpy as np

from chorus.v1 import worker_pb2
from chorus_common.distribution_wire import part_from_proto
from chorus_common.types import DistributionPart, DraftResult, ScoreResult, StepResult
from model_worker.convert import draft_to_proto, score_to_proto, step_to_proto

DENSE = DistributionPart(0, 0.0, None, np.linspace(-9.0, -0.1, 262_144, dtype=np.float32))
SPARSE = DistributionPart(3, -0.25, np.array([7, 2], dtype=np.uint32), np.array([-0.5, -1.5], dtype=np.float16))


def _parts(wire: list[worker_pb2.DistributionPart]) -> list[tuple]:
    decoded = [part_from_proto(p) for p in wire]
    return [
        (p.skip_bytes, p.log_scale, None if p.ids is None else p.ids.tolist(), p.logprobs.tolist()) for p in decoded
    ]


def _expected(parts: list[DistributionPart]) -> list[tuple]:
    return [(p.skip_bytes, p.log_scale, None if p.ids is None else p.ids.tolist(), p.logprobs.tolist()) for p in parts]


def _sent(response: worker_pb2.SessionResponse) -> worker_pb2.SessionResponse:
    return worker_pb2.SessionResponse.FromString(response.SerializeToString())


def test_a_step_result_travels_whole() -> None:
    out = StepResult(
        [DENSE, SPARSE], tokens_fed=3, forward_passes=2, batch_size=5, queue_ms=1.5, compute_ms=7.25, queue_position=4
    )
    got = _sent(step_to_proto(out))
    assert got.WhichOneof("kind") == "step"
    assert _parts(list(got.step.parts)) == _expected([DENSE, SPARSE])
    s = got.step
    assert (s.tokens_fed, s.forward_passes, s.batch_size, s.queue_ms, s.compute_ms, s.queue_position) == (
        3,
        2,
        5,
        1.5,
        7.25,
        4,
    )


def test_empty_results_still_name_their_kind() -> None:
    assert _sent(step_to_proto(StepResult([], 0, 0))).WhichOneof("kind") == "step"
    assert _sent(draft_to_proto(DraftResult([], False, [], 0, 0))).WhichOneof("kind") == "draft"
    assert _sent(score_to_proto(ScoreResult([], 0, 0))).WhichOneof("kind") == "score"


def test_draft_and_score_positions_keep_their_boundaries_and_parts() -> None:
    draft = _sent(draft_to_proto(DraftResult([b"a", b"bc"], True, [[SPARSE], [DENSE], []], 4, 3))).draft
    assert (list(draft.pieces), draft.ended, draft.tokens_fed, draft.forward_passes) == ([b"a", b"bc"], True, 4, 3)
    assert [d.boundary for d in draft.dists] == [True, True, True]
    assert _parts(list(draft.dists[0].parts)) == _expected([SPARSE]) and not draft.dists[2].parts
    assert _parts(list(draft.dists[1].parts)) == _expected([DENSE])
    score = _sent(score_to_proto(ScoreResult([None, [DENSE, SPARSE]], 2, 1))).score
    assert [p.boundary for p in score.positions] == [False, True]
    assert _parts(list(score.positions[1].parts)) == _expected([DENSE, SPARSE])
    assert (score.tokens_fed, score.forward_passes) == (2, 1)
