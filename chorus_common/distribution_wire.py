"""The wire format of a distribution part (worker.proto's DistributionPart): the one codec, which the
worker encodes with (model_worker/convert.py) and the coordinator decodes with (coordinator/workers.py).

ids: little-endian uint32, empty for a part dense over the whole vocabulary; logprobs: packed
little-endian float16 or float32 (the part's dtype), one per id (or per vocabulary entry when dense).
"""

from __future__ import annotations

import numpy as np

from chorus.v1 import worker_pb2
from chorus_common.types import DistributionPart

_DTYPES = {worker_pb2.FLOAT32: np.dtype("<f4"), worker_pb2.FLOAT16: np.dtype("<f2")}
_IDS = np.dtype("<u4")


def part_to_proto(part: DistributionPart) -> worker_pb2.DistributionPart:
    """A part as it travels: float16 logprobs stay float16, any other dtype goes as float32. A sparse part
    has ids (no ids on the wire means dense)."""
    wire = worker_pb2.DistributionPart()
    write_part(part, wire)
    return wire


def write_part(part: DistributionPart, wire: worker_pb2.DistributionPart) -> None:
    """part_to_proto into a message already in place (`response.step.parts.add()`): a part handed to a
    parent's constructor is copied whole, a millisecond for a full distribution of 262,144 entries."""
    if part.ids is not None and part.ids.size == 0:
        raise ValueError("a sparse distribution part without ids reads as a dense one: leave the part out")
    half = part.logprobs.dtype == np.float16
    wire.dtype = worker_pb2.FLOAT16 if half else worker_pb2.FLOAT32
    wire.skip_bytes = part.skip_bytes
    wire.log_scale = part.log_scale
    wire.ids = b"" if part.ids is None else part.ids.astype(_IDS, copy=False).tobytes()
    wire.logprobs = part.logprobs.astype(_DTYPES[wire.dtype], copy=False).tobytes()


def part_from_proto(part: worker_pb2.DistributionPart) -> DistributionPart:
    """The part a worker sent; ValueError for one that breaks the format. The arrays are read-only views
    of the message's bytes (ids widened to int64, for indexing)."""
    if part.dtype not in _DTYPES:
        raise ValueError(f"a worker sent a distribution part of dtype {part.dtype}, not FLOAT32 or FLOAT16")
    dtype = _DTYPES[part.dtype]
    if len(part.logprobs) % dtype.itemsize or len(part.ids) % _IDS.itemsize:
        raise ValueError("a worker sent a distribution part whose ids or logprobs are cut off mid-value")
    logprobs = np.frombuffer(part.logprobs, dtype=dtype)
    ids = np.frombuffer(part.ids, dtype=_IDS).astype(np.int64) if part.ids else None
    if ids is not None and ids.size != logprobs.size:
        raise ValueError(f"a worker sent a distribution part of {ids.size} ids and {logprobs.size} logprobs")
    return DistributionPart(skip_bytes=part.skip_bytes, log_scale=part.log_scale, ids=ids, logprobs=logprobs)
