"""The worker's runtime below the server: KV reuse, rollback, healing and batching are exact."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chorus.v1 import worker_pb2, worker_pb2_grpc
from model_worker.distribution import Format, Part
from model_worker.loading import load_model
from model_worker.runtime import AtCapacity, PromptSpec, Runtime, SessionExpired
from model_worker.server import WorkerServer
from tests.reference import ReferenceModel
from tests.tiny_models import random_gpt2, random_llama

FULL = Format(top_k=0, dtype=np.dtype(np.float32))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    build: Callable[[Path], Path] = {"gpt2": random_gpt2, "llama": random_llama}[request.param]
    return build(tmp_path_factory.mktemp(request.param))


def _as_dict(runtime: Runtime, parts: list[Part]) -> dict[bytes | None, float]:
    out: dict[bytes | None, float] = {}
    for part in parts:
        ids = range(runtime.vocab_size) if part.ids is None else part.ids.tolist()
        for i, lp in zip(ids, part.logprobs.tolist(), strict=True):
            if i in runtime.eos_ids:
                key = None
            elif runtime.special[i]:
                continue
            else:
                key = runtime.tokens[i][part.skip_bytes :]
            out[key] = out.get(key, 0.0) + math.exp(lp + part.log_scale)
    return out


def _assert_close(a: dict[bytes | None, float], b: dict[bytes | None, float]) -> None:
    keys = set(a) | set(b)
    assert max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in keys) < 1e-5


def test_steps_match_a_recompute_from_scratch(model_dir: Path) -> None:
    """Each step with a kept KV cache equals the brute-force reference (no cache, healing by scan)."""
    runtime = Runtime(load_model(str(model_dir)))
    reference = ReferenceModel(model_dir)

    async def run() -> None:
        runtime.batcher.start()
        prompt = "héllo "
        session = runtime.open(PromptSpec(text=prompt))
        generated = b""
        for text in ["", "w", "wo", "wor", "world", "world 你", "world 你好"]:
            data = text.encode()
            out = await runtime.step(session, data[len(generated) :], FULL)
            generated = data
            _assert_close(_as_dict(runtime, out.parts), reference.next_bytes(prompt, generated))
        await runtime.batcher.stop()

    asyncio.run(run())


def test_split_characters_are_healed(model_dir: Path) -> None:
    runtime = Runtime(load_model(str(model_dir)))
    reference = ReferenceModel(model_dir)

    async def run() -> None:
        runtime.batcher.start()
        session = runtime.open(PromptSpec(text="a"))
        committed = b""
        for target in ("🙂".encode()[:1], "🙂".encode()[:3], "🙂".encode(), "🙂é".encode()[:5]):
            out = await runtime.step(session, target[len(committed) :], FULL)
            committed = target
            mine = _as_dict(runtime, out.parts)
            _assert_close(mine, reference.next_bytes("a", committed))
        await runtime.batcher.stop()

    asyncio.run(run())


def test_concurrent_sessions_share_forward_passes_exactly(model_dir: Path) -> None:
    """Sessions of different lengths batched together give what each gives alone."""
    runtime = Runtime(load_model(str(model_dir)))
    prompts = ["a", "hello world", "12+35=", "你好", "the cat sat", "🙂 ok"]
    continuation = [b"x", b"y", b"4", b"!", b" on", b" "]

    async def steps(concurrent: bool) -> tuple[list[dict[bytes | None, float]], int]:
        runtime.batcher.start()
        sessions = [runtime.open(PromptSpec(text=p)) for p in prompts]
        results: list[dict[bytes | None, float]] = []
        biggest = 0
        for appends in ([b""] * len(prompts), continuation, continuation):
            if concurrent:
                outs = await asyncio.gather(*(runtime.step(s, a, FULL) for s, a in zip(sessions, appends, strict=True)))
            else:
                outs = [await runtime.step(s, a, FULL) for s, a in zip(sessions, appends, strict=True)]
            biggest = max([biggest, *(o.batch_size for o in outs)])
            results += [_as_dict(runtime, o.parts) for o in outs]
        for s in sessions:
            runtime.close(s)
        await runtime.batcher.stop()
        return results, biggest

    alone, alone_batch = asyncio.run(steps(concurrent=False))
    runtime.batcher = type(runtime.batcher)(runtime.loaded.model, runtime.loaded.device)
    together, together_batch = asyncio.run(steps(concurrent=True))
    assert alone_batch == 1
    # Every step of the six sessions shares one pass, though they feed different numbers of tokens.
    assert together_batch == len(prompts)
    for a, b in zip(alone, together, strict=True):
        _assert_close(a, b)
    assert not runtime.sessions


def test_health_is_not_serving_until_the_model_is_loaded(model_dir: Path) -> None:
    async def run() -> None:
        server = WorkerServer("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            worker = worker_pb2_grpc.ModelWorkerStub(channel)
            loading = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert loading.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await worker.Info(worker_pb2.InfoRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            await server.ready(Runtime(load_model(str(model_dir))))
            ready = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert ready.status == health_pb2.HealthCheckResponse.SERVING
            assert (await worker.Info(worker_pb2.InfoRequest(), timeout=5)).vocab_size > 0
        await server.stop(grace=0)

    asyncio.run(run())


def test_accelerate_device_map_path_gives_the_same_distribution(model_dir: Path) -> None:
    """device 'auto' with max_memory goes through accelerate's device_map (CPU-only here)."""
    plain = Runtime(load_model(str(model_dir)))
    mapped = Runtime(load_model(str(model_dir), device="auto", max_memory={"cpu": "1GiB"}))

    async def first_step(runtime: Runtime) -> dict[bytes | None, float]:
        runtime.batcher.start()
        session = runtime.open(PromptSpec(text="hello"))
        out = await runtime.step(session, b"", FULL)
        await runtime.batcher.stop()
        return _as_dict(runtime, out.parts)

    _assert_close(asyncio.run(first_step(plain)), asyncio.run(first_step(mapped)))


def test_a_full_worker_refuses_new_sessions(model_dir: Path) -> None:
    runtime = Runtime(load_model(str(model_dir)), max_sessions=2)
    first, _ = runtime.open(PromptSpec(text="a")), runtime.open(PromptSpec(text="b"))
    with pytest.raises(AtCapacity):
        runtime.open(PromptSpec(text="c"))
    runtime.close(first)
    runtime.close(runtime.open(PromptSpec(text="c")))


def test_sessions_idle_past_the_ttl_are_reclaimed(model_dir: Path) -> None:
    runtime = Runtime(load_model(str(model_dir)))

    async def run() -> None:
        runtime.batcher.start()
        idle, busy = runtime.open(PromptSpec(text="a")), runtime.open(PromptSpec(text="b"))
        await runtime.step(idle, b"", FULL)
        await runtime.step(busy, b"", FULL)
        idle.last_used -= 120  # two minutes without a step
        assert runtime.reap(ttl=60) == 1
        assert list(runtime.sessions.values()) == [busy] and idle.kv.layers is None
        with pytest.raises(SessionExpired):
            await runtime.step(idle, b"x", FULL)
        await runtime.step(busy, b"x", FULL)  # the active one is untouched
        await runtime.batcher.stop()

    asyncio.run(run())


def test_score_gives_the_rows_at_every_token_boundary(model_dir: Path) -> None:
    """A scoring pass over drafted pieces returns, at each boundary, the distribution a from-scratch
    forward pass gives there; the session then holds the pieces."""
    import torch

    loaded = load_model(str(model_dir))
    runtime = Runtime(loaded)
    prompt, pieces = "the cat ", [b"sat", b" on", b" the", b" mat", b"."]

    async def run() -> list[list[Part] | None]:
        runtime.batcher.start()
        session = runtime.open(PromptSpec(text=prompt))
        await runtime.step(session, b"", FULL)  # the row at the end of the prompt is now cached
        out = await runtime.score(session, b"", 0, pieces, top_k=5)
        assert bytes(session.generated) == b"".join(pieces)
        await runtime.batcher.stop()
        return out.positions

    positions = asyncio.run(run())
    assert len(positions) == len(pieces) + 1
    ids = runtime.conditioner.encode(prompt + b"".join(pieces).decode(), True)
    with torch.no_grad():
        logits = torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), -1)
    ends, total = {}, 0
    for t, i in enumerate(ids):
        total += len(runtime.tokens[i])
        ends[total] = t
    offset = total - len((prompt + b"".join(pieces).decode()).encode())  # BOS / dummy-prefix bytes
    checked = 0
    for j, parts in enumerate(positions):
        at = len(prompt.encode()) + sum(len(p) for p in pieces[:j]) + offset
        if parts is None:
            assert at not in ends
            continue
        expected_ids = torch.topk(logits[ends[at]], 5).indices.tolist()
        assert parts[0].ids is not None and parts[0].ids.tolist() == expected_ids
        assert np.allclose(parts[0].logprobs, logits[ends[at]][expected_ids].numpy(), atol=1e-4)
        checked += 1
    assert checked >= 2
