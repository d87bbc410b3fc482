"""The worker's KV-cache budget: steps past it wait, then get RESOURCE_EXHAUSTED; memory stays bounded."""

from __future__ import annotations

import grpc
import pytest

from chorus.v1 import worker_pb2
from coordinator.cluster import spawn_worker
from coordinator.config import ModelSpec
from coordinator.types import Prompt
from coordinator.workers import Transport, WorkerClient
from tests.cluster_helpers import MODELS, LoopThread

PROMPT = "1+2=3\n4+5=9\n6+7="


def test_steps_past_the_kv_budget_wait_then_are_refused(loop: LoopThread) -> None:
    probe = spawn_worker(ModelSpec(name="arith-bpe", path=str(MODELS / "arith-bpe")), threads=1)
    try:
        tokens, held = loop.run(_hold_one(probe.address))
    finally:
        probe.stop()
    per_token = held // tokens  # what the worker's caches really take, per token
    assert per_token * tokens == held
    budget_mib = (tokens + 4) * per_token / 2**20  # room for one session, not two
    args = ("--kv-budget-mib", repr(budget_mib), "--kv-wait", "0.5")
    worker = spawn_worker(ModelSpec(name="arith-bpe", path=str(MODELS / "arith-bpe")), threads=1, extra_args=args)
    try:
        loop.run(_second_session_refused_until_the_first_frees(worker.address))
    finally:
        worker.stop()


async def _hold_one(address: str) -> tuple[int, int]:
    client = WorkerClient(address)
    session = client.session(30)
    try:
        await session.open(Prompt(text=PROMPT), "kv-probe")
        step = await session.step(b"", Transport(top_k=5, half=False))
        info = await client.stub.Info(worker_pb2.InfoRequest())
        return step.tokens_fed, info.kv_cache_bytes
    finally:
        session.cancel()
        await client.close()


async def _second_session_refused_until_the_first_frees(address: str) -> None:
    client = WorkerClient(address)
    first, second, third = client.session(30), client.session(30), client.session(30)
    try:
        await first.open(Prompt(text=PROMPT), "first")
        await first.step(b"", Transport(top_k=5, half=False))
        await second.open(Prompt(text=PROMPT), "second")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await second.step(b"", Transport(top_k=5, half=False))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KV-cache budget" in (caught.value.details() or "")
        first.cancel()  # frees its cache: the next session fits
        await third.open(Prompt(text=PROMPT), "third")
        step = None
        for _ in range(50):  # the worker notices the cancelled stream within moments
            try:
                step = await third.step(b"", Transport(top_k=5, half=False))
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                third = client.session(30)
                await third.open(Prompt(text=PROMPT), "third")
        assert step is not None and step.forward_passes == 1
    finally:
        for s in (first, second, third):
            s.cancel()
        await client.close()
