"""What the coordinator does per step for k models, timed in-process with no workers: parse each worker's
message, map it into the union vocabulary, mix, choose. Used by scripts/bench.py (the coordinator CPU
figure) and scripts/bench_gpu.py (GaC's mix on top of two GPU members); it imports only the coordinator's
vocabulary code, so it runs where the rest of the CPU bench's dependencies are not installed."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chorus.v1 import worker_pb2
from chorus_common.distribution_wire import part_from_proto
from chorus_common.types import SamplingParams
from coordinator.union_dist import ExtraIds, choose, from_parts, mix
from coordinator.union_vocab import ModelVocab, UnionVocab


def synthetic_vocabs(k: int, vocab: int, overlap: float = 0.6, seed: int = 0) -> list[ModelVocab]:
    """k byte vocabularies of `vocab` tokens each; `overlap` of them shared by all, in a different order per model.

    Id 0 is each model's end of sequence; byte strings are 2-9 bytes long, like real subword tokens.
    """
    rng = np.random.default_rng(seed)
    n_shared = int((vocab - 1) * overlap)
    shared = [b"%x" % (i + 16) for i in range(n_shared)]
    vocabs = []
    for m in range(k):
        own = [b"m%d~%x" % (m, i) for i in range(vocab - 1 - n_shared)]
        pool = shared + own
        order = rng.permutation(len(pool))
        tokens = [b"</s>", *(pool[i] for i in order)]
        vocabs.append(ModelVocab(tokens=tokens, special=[True] + [False] * (vocab - 1), eos_ids=frozenset({0})))
    return vocabs


def _step_payload(vocab: int, transport: str, top_k: int, rng: np.random.Generator) -> bytes:
    """A serialized SessionResponse as a worker sends it for one step (one dense or top-k part)."""
    logits = rng.standard_normal(vocab) * 3.0
    logprobs = logits - (np.log(np.exp(logits - logits.max()).sum()) + logits.max())
    if transport == "full":
        part = worker_pb2.DistributionPart(
            skip_bytes=0, log_scale=0.0, logprobs=logprobs.astype("<f2").tobytes(), dtype=worker_pb2.FLOAT16
        )
    else:
        ids = np.argpartition(-logprobs, top_k - 1)[:top_k]
        ids = ids[np.argsort(-logprobs[ids])]
        values = logprobs[ids].astype("<f4")
        part = worker_pb2.DistributionPart(
            skip_bytes=0,
            log_scale=0.0,
            ids=ids.astype("<u4").tobytes(),
            logprobs=values.tobytes(),
            dtype=worker_pb2.FLOAT32,
        )
    step = worker_pb2.StepResult(parts=[part], tokens_fed=1, forward_passes=1, batch_size=1)
    return worker_pb2.SessionResponse(step=step).SerializeToString()


def coordinator_cpu_per_step(
    k: int,
    vocab: int,
    transport: str,
    steps: int = 200,
    top_k: int = 20,
    overlap: float = 0.6,
    seed: int = 0,
    union: UnionVocab | None = None,
    vocabs: list[ModelVocab] | None = None,
) -> dict[str, Any]:
    """Time what the coordinator does per step for k models: parse + decode each worker's message, map
    it into the union (from_parts), mix, choose (greedy). Returns median / p90 microseconds and sizes."""
    if transport not in ("topk", "full"):
        raise ValueError(f"transport: {transport!r}, expected 'topk' or 'full'")
    if vocabs is None:
        vocabs = synthetic_vocabs(k, vocab, overlap, seed)
    if union is None:
        union = UnionVocab(vocabs)
    rng = np.random.default_rng(seed + 1)
    variants = 4  # a few different distributions per model, so no step sees a hot repeat of the last
    payloads = [[_step_payload(vocab, transport, top_k, rng) for _ in range(k)] for _ in range(variants)]
    params = SamplingParams()
    choice_rng = np.random.default_rng(seed)
    weights = np.ones(k)
    timings: list[float] = []
    uid = -1
    for s in range(steps + max(2, steps // 10)):  # the first few are warm-up
        payload = payloads[s % variants]
        started = time.perf_counter()
        extras = ExtraIds(union)
        dists = []
        for m in range(k):
            response = worker_pb2.SessionResponse.FromString(payload[m])
            parts = [part_from_proto(p) for p in response.step.parts]
            dists.append(from_parts(parts, union.index[m], vocabs[m].tokens, extras))
        dist = mix(dists, weights / weights.sum(), extras.size)
        uid = choose(dist, params, choice_rng)
        elapsed = time.perf_counter() - started
        if s >= max(2, steps // 10):
            timings.append(elapsed * 1e6)
    return {
        "k": k,
        "vocab": vocab,
        "transport": transport,
        "top_k": top_k if transport == "topk" else 0,
        "union_size": union.size,
        "message_bytes": len(payloads[0][0]),
        "steps": len(timings),
        "median_us": float(statistics.median(timings)),
        "p90_us": float(np.percentile(timings, 90)),
        "last_uid": uid,
    }
