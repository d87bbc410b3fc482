"""What is measured on the served ensemble: each member's first-step distribution on an item (through the
workers' session API, mapped into the coordinator's union vocabulary), and the accuracy of a config on
items (a coordinator over the same workers, greedy requests through the SDK)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import numpy as np

import chorus
from chorus_common.types import Prompt
from chorus_local.cluster import start_coordinator
from chorus_tune.calibration import FirstStep, summarize
from chorus_tune.items import Item
from coordinator.config import EnsembleConfig
from coordinator.ensemble import Ensemble, connect
from coordinator.union_dist import ExtraIds, from_parts
from coordinator.workers import Transport

_FULL = Transport(top_k=0, half=False)
# Generous step budgets: tuning runs many requests at once on a busy machine.
STEP_TIMEOUT_S = 60.0


def prompt_of(item: Item) -> Prompt:
    if item.prompt is not None:
        return Prompt(text=item.prompt)
    return Prompt(messages=item.messages, apply_chat_template=True)


def gold_uids(ensemble: Ensemble, item: Item) -> np.ndarray:
    """The union ids a right answer may start with: every entry a gold continuation's bytes begin with."""
    assert ensemble.union is not None
    found = {ensemble.union.lookup(g[:n]) for g in item.gold_continuations() for n in range(1, len(g) + 1)}
    return np.array(sorted(u for u in found if u is not None), dtype=np.int64)


async def first_steps(
    config: EnsembleConfig, addresses: list[str], items: Sequence[Item], concurrency: int
) -> tuple[list[list[FirstStep]], list[np.ndarray]]:
    """(steps[item][member], gold union ids per item): each member's whole next-token distribution right
    after each item's prompt, summarised."""
    ensemble = await connect(config, addresses)
    gate = asyncio.Semaphore(concurrency)
    try:

        async def one(item: Item, m: int) -> FirstStep:
            member = ensemble.members[m]
            assert ensemble.union is not None and member.vocab is not None
            client = next(iter(member.replicas.values())).client
            async with gate:
                session = client.session(timeout=600)
                try:
                    await session.open(prompt_of(item), f"tune-{uuid.uuid4().hex[:12]}")
                    step = await session.step(b"", _FULL)
                finally:
                    session.cancel()
            dist = from_parts(step.parts, member.index, member.vocab.tokens, ExtraIds(ensemble.union))
            return summarize(dist, gold_uids(ensemble, item))

        n = len(ensemble.members)
        flat = await asyncio.gather(*(one(item, m) for item in items for m in range(n)))
        golds = [gold_uids(ensemble, item) for item in items]
    finally:
        await ensemble.close()
    return [list(flat[i * n : (i + 1) * n]) for i in range(len(items))], golds


async def outcomes(
    config: EnsembleConfig,
    addresses: list[str],
    items: Sequence[Item],
    max_new_tokens: int,
    concurrency: int,
    stop: Sequence[str] = (),
) -> list[bool]:
    """Whether the config's ensemble answers each item right (greedy; a failed request counts as wrong)."""
    limits = config.limits.model_copy(update={"step_timeout_s": max(config.limits.step_timeout_s, STEP_TIMEOUT_S)})
    config = config.model_copy(update={"limits": limits})
    running = await start_coordinator(config, addresses, port=0)
    gate = asyncio.Semaphore(concurrency)
    try:
        async with chorus.AsyncClient(f"127.0.0.1:{running.port}", timeout=600) as client:

            async def one(item: Item) -> bool:
                kwargs: dict[str, object] = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
                if stop:
                    kwargs["stop"] = list(stop)
                if item.prompt is not None:
                    kwargs["prompt"] = item.prompt
                else:
                    kwargs.update(
                        messages=[{"role": r, "content": c} for r, c in item.messages], apply_chat_template=True
                    )
                async with gate:
                    try:
                        result = await client.generate(**kwargs)
                    except chorus.ChorusError:
                        return False
                return item.is_correct(result.text)

            return list(await asyncio.gather(*(one(item) for item in items)))
    finally:
        await running.stop(grace=0)
