"""The worker's KV storage: a budget caps its slots; new sessions past them wait, then get RESOURCE_EXHAUSTED."""

from __future__ import annotations

import grpc
import pytest

from chorus.v1 import worker_pb2
from chorus_common.types import Prompt
from chorus_local.cluster import spawn_worker
from coordinator.config import ModelSpec
from coordinator.workers import Transport, WorkerClient
from tests.cluster_helpers import MODELS, LoopThread

PROMPT = "1+2=3\n4+5=9\n6+7="
SLOT_TOKENS = 64


def test_sessions_past_the_kv_budget_wait_then_are_refused(loop: LoopThread) -> None:
    spec = ModelSpec(name="arith-bpe", path=str(MODELS / "arith-bpe"))
    length = {"max_model_len": SLOT_TOKENS}
    probe = spawn_worker(spec, threads=1, options=length)
    try:
        tokens, held, info = loop.run(_hold_one(probe.address))
    finally:
        probe.stop()
    per_token = held // tokens  # what one cached token takes in the storage
    assert per_token * tokens == held and info.context_length == SLOT_TOKENS and info.kv_slots == 64
    budget_mib = 1.5 * SLOT_TOKENS * per_token / 2**20  # room for one slot, not two
    options = {**length, "kv_budget_mib": budget_mib, "kv_wait": 1.0}
    worker = spawn_worker(spec, threads=1, options=options)
    try:
        loop.run(_second_session_waits_then_is_refused(worker.address))
    finally:
        worker.stop()


async def _hold_one(address: str) -> tuple[int, int, worker_pb2.ModelInfo]:
    client = WorkerClient(address)
    session = client.session(30)
    try:
        await session.open(Prompt(text=PROMPT), "kv-probe")
        step = await session.step(b"", Transport(top_k=5, half=False))
        info = await client.stub.Info(worker_pb2.InfoRequest())
        return step.tokens_fed, info.kv_cache_bytes, info
    finally:
        session.cancel()
        await client.close()


async def _second_session_waits_then_is_refused(address: str) -> None:
    client = WorkerClient(address)
    first, second, third = client.session(30), client.session(30), client.session(30)
    try:
        assert (await client.stub.Info(worker_pb2.InfoRequest())).kv_slots == 1
        await first.open(Prompt(text=PROMPT), "first")
        await first.step(b"", Transport(top_k=5, half=False))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await second.open(Prompt(text=PROMPT), "second")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KV-cache slots" in (caught.value.details() or "") and "retry later" in (caught.value.details() or "")
        first.cancel()  # frees its slot: the next session gets it (after the worker notices the cancel)
        await third.open(Prompt(text=PROMPT), "third")
        step = await third.step(b"", Transport(top_k=5, half=False))
        assert step.forward_passes == 1
    finally:
        for s in (first, second, third):
            s.cancel()
        await client.close()
