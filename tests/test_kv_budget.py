"""The worker's KV cache is a pool of blocks: a budget sizes it; sessions hold the blocks their tokens fill;
a new session whose prompt does not fit the free blocks waits, then gets RESOURCE_EXHAUSTED; a prompt that
begins like an earlier one takes that one's cached blocks instead of computing them."""

from __future__ import annotations

import grpc
import pytest

from chorus.v1 import worker_pb2
from chorus_common.types import Prompt
from chorus_local.cluster import spawn_worker
from coordinator.config import ModelSpec
from coordinator.workers import Transport, WorkerClient
from tests.cluster_helpers import MODELS, LoopThread

PROMPT = "12+34=46\n" * 8 + "5+6="  # 52 tokens of the arithmetic tokenizer: 4 blocks of 16
OTHER = "98+76=174\n" * 7 + "5+6="  # as long, sharing no block with PROMPT
CONTEXT = 64


def test_sessions_past_the_kv_budget_wait_then_are_refused(loop: LoopThread) -> None:
    spec = ModelSpec(name="arith-bpe", path=str(MODELS / "arith-bpe"))
    length = {"max_model_len": CONTEXT}
    probe = spawn_worker(spec, threads=1, options=length)
    try:
        tokens, held, info = loop.run(_hold_one(probe.address))
    finally:
        probe.stop()
    blocks = -(-tokens // info.kv_block_size)
    per_block = held // blocks  # what one block takes over every layer
    assert per_block * blocks == held and info.context_length == CONTEXT and info.max_sessions == 64
    budget_mib = 6 * per_block / 2**20  # one context (4 blocks) and 2 more: not two such prompts
    options = {**length, "kv_budget_mib": budget_mib, "kv_wait": 1.0}
    worker = spawn_worker(spec, threads=1, options=options)
    try:
        loop.run(_second_session_waits_then_is_refused(worker.address, tokens))
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


async def _second_session_waits_then_is_refused(address: str, prompt_tokens: int) -> None:
    client = WorkerClient(address)
    first, second, sharing, third = (client.session(30) for _ in range(4))
    try:
        info = await client.stub.Info(worker_pb2.InfoRequest())
        assert (info.kv_blocks, info.kv_blocks_free) == (6, 6)
        await first.open(Prompt(text=PROMPT), "first")
        fed = (await first.step(b"", Transport(top_k=5, half=False))).tokens_fed
        assert fed == prompt_tokens
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # 4 blocks needed, 2 free
            await second.open(Prompt(text=OTHER), "second")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = caught.value.details() or ""
        assert "KV blocks free" in details and "retry later" in details
        # The same prompt shares the first session's three full blocks: it needs one block of its own.
        await sharing.open(Prompt(text=PROMPT), "sharing")
        step = await sharing.step(b"", Transport(top_k=5, half=False))
        assert step.forward_passes == 1 and step.tokens_fed == prompt_tokens - 3 * info.kv_block_size
        info = await client.stub.Info(worker_pb2.InfoRequest())
        assert info.prefix_cache_hit_tokens == 3 * info.kv_block_size and info.kv_blocks_free == 1
        first.cancel()  # frees its blocks (the full ones stay cached): the next session gets in
        sharing.cancel()
        await third.open(Prompt(text=OTHER), "third")
        step = await third.step(b"", Transport(top_k=5, half=False))
        assert step.forward_passes == 1
    finally:
        for s in (first, second, sharing, third):
            s.cancel()
        await client.close()
