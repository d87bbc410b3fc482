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
from coordinator.union_dist import ExtraIds, UnionDist, from_parts
from coordinator.workers import Transport

_FULL = Transport(top_k=0, half=False)
# Generous step budgets: tuning runs many requests at once on a busy machine.
STEP_TIMEOUT_S = 60.0


def prompt_of(item: Item) -> Prompt:
    if item.prompt is not None:
        return Prompt(text=item.prompt)
    return Prompt(messages=item.messages, apply_chat_template=True)


def gold_uids(ensemble: Ensemble, item: Item, after: bytes = b"") -> np.ndarray:
    """The union ids a right answer may start with, after `after` is written: every entry the rest of a
    gold continuation that starts with `after` begins with."""
    assert ensemble.union is not None
    rests = [g[len(after) :] for g in item.gold_continuations() if g.startswith(after) and len(g) > len(after)]
    found = {ensemble.union.lookup(r[:n]) for r in rests for n in range(1, len(r) + 1)}
    return np.array(sorted(u for u in found if u is not None), dtype=np.int64)


# Whitespace steps skipped at most, per item (a newline, then a space, ...).
MAX_LEADING_STEPS = 4


def forced_whitespace(ensemble: Ensemble, dists: Sequence[UnionDist], item: Item, after: bytes) -> bytes | None:
    """The whitespace every member would write next, if they all would and a gold continuation goes on
    with it: a step that decides nothing about the answer ("4 * 8 =" is followed by " ", then "32")."""
    assert ensemble.union is not None
    tops = {ensemble.union.bytes_of(int(d.uids[np.argmax(d.probs)])) for d in dists if d.uids.size}
    if len(tops) != 1 or len(dists) == 0:
        return None
    top = tops.pop()
    if not top or top.strip() or not any(g.startswith(after + top) for g in item.gold_continuations()):
        return None
    return top


async def first_steps(
    config: EnsembleConfig, addresses: list[str], items: Sequence[Item], concurrency: int
) -> tuple[list[list[FirstStep]], list[np.ndarray]]:
    """(steps[item][member], gold union ids per item): each member's whole next-token distribution at the
    first step of each item's answer, summarised. That step is the one right after the prompt, unless
    every member would write the same whitespace there first (the gold answer going on with it): then the
    whitespace is written (up to MAX_LEADING_STEPS times) and the step after it is the first of the
    answer; a step that only writes the space before "32" tells nothing of the members' arithmetic."""
    ensemble = await connect(config, addresses)
    gate = asyncio.Semaphore(concurrency)
    try:

        async def one(item: Item) -> tuple[list[FirstStep], np.ndarray]:
            assert ensemble.union is not None
            sessions = [next(iter(m.replicas.values())).client.session(timeout=600) for m in ensemble.members]

            async def ask(m: int, append: bytes) -> UnionDist:
                member = ensemble.members[m]
                assert ensemble.union is not None and member.vocab is not None
                step = await sessions[m].step(append, _FULL)
                return from_parts(step.parts, member.index, member.vocab.tokens, ExtraIds(ensemble.union))

            async with gate:
                try:
                    request_id = f"tune-{uuid.uuid4().hex[:12]}"
                    await asyncio.gather(*(s.open(prompt_of(item), request_id) for s in sessions))
                    dists = await asyncio.gather(*(ask(m, b"") for m in range(len(sessions))))
                    written = b""
                    for _ in range(MAX_LEADING_STEPS):
                        space = forced_whitespace(ensemble, dists, item, written)
                        if space is None:
                            break
                        written += space
                        dists = await asyncio.gather(*(ask(m, space) for m in range(len(sessions))))
                finally:
                    for s in sessions:
                        s.cancel()
            gold = gold_uids(ensemble, item, written)
            return [summarize(d, gold) for d in dists], gold

        measured = await asyncio.gather(*(one(item) for item in items))
    finally:
        await ensemble.close()
    return [m[0] for m in measured], [m[1] for m in measured]


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
