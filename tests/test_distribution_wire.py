"""The one codec of a distribution part, which the worker encodes with and the coordinator decodes with:
both ways, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from chorus.v1 import worker_pb2
from chorus_common.distribution_wire import part_from_proto, part_to_proto
from chorus_common.types import DistributionPart


def test_the_bytes_are_little_endian_uint32_ids_and_packed_logprobs() -> None:
    part = DistributionPart(2, -0.5, np.array([1, 258], dtype=np.uint32), np.array([-1.0, -2.0], dtype=np.float32))
    wire = part_to_proto(part)
    assert wire.ids == b"\x01\x00\x00\x00\x02\x01\x00\x00"
    assert wire.logprobs == np.array([-1.0, -2.0], dtype="<f4").tobytes() == b"\x00\x00\x80\xbf\x00\x00\x00\xc0"
    assert (wire.skip_bytes, wire.log_scale, wire.dtype) == (2, -0.5, worker_pb2.FLOAT32)
    dense = part_to_proto(DistributionPart(0, 0.0, None, np.array([-0.5, -1.0], dtype=np.float16)))
    assert (dense.ids, dense.dtype, dense.logprobs) == (b"", worker_pb2.FLOAT16, b"\x00\xb8\x00\xbc")


@settings(max_examples=200, deadline=None)
@given(
    skip=st.integers(0, 2**32 - 1),
    scale=st.floats(-1024, 0, width=32, allow_subnormal=False),
    half=st.booleans(),
    sparse=st.booleans(),
    values=hnp.arrays(np.float32, st.integers(0, 64), elements=st.floats(-1024, 0, width=16, allow_subnormal=False)),
    data=st.data(),
)
def test_a_part_decodes_to_what_was_encoded(
    skip: int, scale: float, half: bool, sparse: bool, values: np.ndarray, data: st.DataObject
) -> None:
    logprobs = values.astype(np.float16 if half else np.float32)
    sparse = sparse and values.size > 0  # a sparse part has ids
    ids = data.draw(hnp.arrays(np.uint32, values.size, elements=st.integers(0, 2**32 - 1))) if sparse else None
    sent = DistributionPart(skip, scale, ids, logprobs)
    wire = part_to_proto(sent)
    got = part_from_proto(worker_pb2.DistributionPart.FromString(wire.SerializeToString()))
    assert (got.skip_bytes, got.log_scale) == (skip, scale)
    assert got.logprobs.dtype == logprobs.dtype and np.array_equal(got.logprobs, logprobs)
    if ids is None:
        assert got.ids is None
    else:
        assert got.ids is not None and got.ids.dtype == np.int64 and np.array_equal(got.ids, ids)
    assert part_to_proto(got) == wire  # and back: the same bytes


def test_a_sparse_part_without_ids_is_not_sent_as_a_dense_one() -> None:
    with pytest.raises(ValueError, match="without ids"):
        part_to_proto(DistributionPart(0, 0.0, np.array([], dtype=np.uint32), np.array([], dtype=np.float32)))


def test_other_float_dtypes_travel_as_float32() -> None:
    wire = part_to_proto(DistributionPart(0, 0.0, None, np.array([-0.25], dtype=np.float64)))
    assert wire.dtype == worker_pb2.FLOAT32
    assert part_from_proto(wire).logprobs.tolist() == [-0.25]


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (worker_pb2.DistributionPart(logprobs=b"\x00" * 4, dtype=7), "dtype 7"),
        (worker_pb2.DistributionPart(logprobs=b"\x00" * 6, dtype=worker_pb2.FLOAT32), "cut off"),
        (worker_pb2.DistributionPart(ids=b"\x00" * 5, logprobs=b"\x00" * 4, dtype=worker_pb2.FLOAT32), "cut off"),
        (worker_pb2.DistributionPart(ids=b"\x00" * 8, logprobs=b"\x00" * 4, dtype=worker_pb2.FLOAT32), "2 ids and 1"),
    ],
)
def test_a_part_that_breaks_the_format_is_refused(wire: worker_pb2.DistributionPart, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        part_from_proto(wire)
