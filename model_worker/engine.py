"""The transformers backend: a scheduler loop that runs the sessions' feeds as forward passes over the paged
KV cache (kv_manager.py), one pass per round (scheduler.py), in a thread of its own (model_runner.py).

A round takes every waiting feed it can: decodes whole, prompts in chunks, up to `max_batched_tokens`
tokens in one ragged pass. A feed's first tokens are looked up in the prefix cache before it is planned;
the blocks a slice writes are reserved before its pass. A feed that finds no free blocks waits for
`kv_wait` seconds (blocks free as sessions end or roll back), then fails with OutOfBlocks.

With `decode_stretch` S (Sarathi-Serve's stall-free budget; 1.5 by default, off at 0), while more waits than one pass
holds, a pass that carries decodes takes only as many prompt tokens as keep it within S times a pass of every
waiting session's decode (their pace once all of them write), from a running estimate of both costs
(`scheduler.PassCosts`): sessions that already write keep about that pace while a burst of prompts is read, and the
prompts wait longer for their first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from chorus_common.worker_args import WorkerArgs
from model_worker import metrics
from model_worker.backend import KVReport
from model_worker.conditioning import Branch
from model_worker.kv_manager import KVManager, OutOfBlocks, SessionKV
from model_worker.model_runner import ModelRunner
from model_worker.scheduler import SHORT, Feed, PassCosts, PassStats, Slice, plan_round

# The longest a round waits for the sessions of the last pass to send their next feeds.
RETURN_WINDOW_S = 0.02


class Engine:
    def __init__(
        self,
        model: Any,
        device: torch.device,
        kv: KVManager,
        name: str = "model",
        max_batched_tokens: int = WorkerArgs.max_batched_tokens,
        prefill_chunk: int = WorkerArgs.prefill_chunk,
        kv_wait_s: float = WorkerArgs.kv_wait,
        cuda_graphs: bool = WorkerArgs.cuda_graphs,
        decode_stretch: float = WorkerArgs.decode_stretch,
    ) -> None:
        self.kv = kv
        self.runner = ModelRunner(model, kv, device, cuda_graphs=cuda_graphs, name=name)
        self._name = name
        self.max_batched_tokens = max_batched_tokens
        self.prefill_chunk = min(prefill_chunk, max_batched_tokens)
        self.decode_stretch = decode_stretch
        self.costs = PassCosts()
        self.kv_wait_s = kv_wait_s
        self._waiting: list[Feed] = []
        self._wakeup = asyncio.Event()
        self.blocks_freed = asyncio.Event()  # set whenever blocks return to the pool
        # One thread runs the model, so the event loop stays free to take new steps and answer health checks.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._task: asyncio.Task[None] | None = None
        self._evictions = 0
        self._returning: set[int] = set()  # sessions whose feeds the last pass finished: their next ones are expected
        self._last_pass_s = 0.0

    @property
    def queued(self) -> int:
        """Feeds waiting for or in a pass (the worker's own report of its queued work)."""
        return len(self._waiting)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for feed in self._waiting:
            if not feed.future.done():
                feed.future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def warm_up(self) -> None:
        """One token through a session of its own: pays the first pass's one-off costs before the worker
        says it is ready."""
        kv = SessionKV()
        try:
            self.kv.reserve(kv, 1)
            feed = Feed(kv, [0], {0}, None, 0)  # type: ignore[arg-type]
            self._run([Slice(feed, [0], 0, [0])])
        finally:
            self.kv.free(kv)

    # ------------------------------------------------------------------ the session's side

    async def forward(
        self, kv: SessionKV, new_ids: list[int], want: Collection[int], branches: Collection[Branch] = ()
    ) -> PassStats:
        """Append new_ids to the session's cache; kv.rows then holds the output rows at the `want`
        positions that this feed computed (positions before len(kv.ids) are not recomputed), and
        kv.branch_rows those of the `branches` that start at positions it feeds."""
        start = len(kv.ids)
        future: asyncio.Future[PassStats] = asyncio.get_running_loop().create_future()
        wanted = {p for p in want if start <= p < start + len(new_ids)}
        forks = tuple(b for b in branches if start <= b[0] < start + len(new_ids))
        self._waiting.append(Feed(kv, list(new_ids), wanted, future, len(self._waiting), branches=forks))
        metrics.QUEUE_DEPTH.labels(self._name).set(len(self._waiting))
        self._wakeup.set()
        return await future

    def new_cache(self, prompt: list[int]) -> SessionKV | None:
        kv = SessionKV()
        # Every prompt token but the last may come from the prefix cache: the first step needs the last's row.
        self.take_cached_prefix(kv, prompt, len(prompt) - 1)
        if not self.kv.can_hold(kv, len(prompt)):
            self.kv.free(kv)
            return None
        self.kv.reserve(kv, len(prompt))
        return kv

    def report(self) -> KVReport:
        kv = self.kv
        return KVReport(
            kv.block_size,
            kv.pools[0].blocks - 1,
            kv.pools[0].available,
            kv.held_bytes(),
            kv.cached_bytes(),
            kv.usage(),
            kv.hits * kv.block_size,
        )

    def truncate(self, kv: SessionKV, n: int) -> None:
        self.kv.truncate(kv, n)
        self.blocks_freed.set()

    def release(self, kv: SessionKV) -> None:
        self.kv.free(kv)
        self.blocks_freed.set()
        self._wakeup.set()

    # ------------------------------------------------------------------ the loop

    def _admit(self, feed: Feed) -> None:
        """A feed's first round: take what the prefix cache holds of its tokens."""
        if feed.admitted:
            return
        feed.admitted = True
        taken = self.take_cached_prefix(feed.kv, feed.ids, min(feed.want, default=len(feed.kv.ids) + len(feed.ids)))
        feed.done += taken
        feed.cached += taken

    def take_cached_prefix(self, kv: SessionKV, tokens: list[int], before: int) -> int:
        """Let the session hold the prefix cache's blocks for the next of `tokens` (wholly before position
        `before`); how many tokens they hold."""
        taken = self.kv.match_prefix(kv, tokens, before)
        metrics.PREFIX_CACHE_QUERIES.labels(self._name).inc(len(tokens))
        metrics.PREFIX_CACHE_HITS.labels(self._name).inc(taken)
        return taken

    def _reserve(self, feed: Feed, n: int) -> bool:
        if self.kv.can_hold(feed.kv, len(feed.kv.ids) + n):
            self.kv.reserve(feed.kv, len(feed.kv.ids) + n)
            return True
        return False

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._waiting = [f for f in self._waiting if not f.future.done()]
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._gather_returning(loop)
            for feed in self._waiting:
                self._admit(feed)
                if feed.remaining == 0:
                    self._finish(feed)
            waiting = [f for f in self._waiting if not f.future.done()]
            slices = plan_round(waiting, self._pass_tokens(waiting), self.prefill_chunk, self._reserve)
            self._count_evictions()
            if not slices:
                await self._wait_for_blocks(waiting)
                continue
            started = time.perf_counter()
            for s in slices:
                s.feed.started_at = s.feed.started_at or started
            try:
                rows = await loop.run_in_executor(self._executor, self._run, slices)
            except Exception as exc:
                for s in slices:
                    if not s.feed.future.done():
                        s.feed.future.set_exception(exc)
                continue
            returned = time.perf_counter()
            self.runner.clock.handed(started, returned)
            compute_ms = (returned - started) * 1e3
            metrics.STEP_LATENCY.labels(self._name).observe(compute_ms / 1e3)
            metrics.BATCH_SIZE.labels(self._name).observe(len(slices))
            if self.decode_stretch:
                decodes = [len(s.tokens) for s in slices if s.feed.remaining <= SHORT]
                self.costs.observe(compute_ms / 1e3, len(decodes), sum(len(s.tokens) for s in slices) - sum(decodes))
            for s, got in zip(slices, rows, strict=True):
                self._record(s, got, compute_ms, len(slices))
            self._returning = {id(s.feed.kv) for s in slices if s.feed.future.done()}
            self._last_pass_s = compute_ms / 1e3
            metrics.QUEUE_DEPTH.labels(self._name).set(sum(not f.future.done() for f in self._waiting))

    def _pass_tokens(self, waiting: list[Feed]) -> int:
        """The next pass's token budget: max_batched_tokens, or with decode_stretch and decodes waiting, the
        decodes' tokens and the prompt tokens that keep the pass within the stretch."""
        if not self.decode_stretch:
            return self.max_batched_tokens
        if sum(f.remaining for f in waiting) <= self.max_batched_tokens:
            # What waits fits in one pass (a few prompts, a burst's tail): read it whole. The writers wait one
            # pass of the budget, not several stretched ones, and then all write together.
            return self.max_batched_tokens
        short = [f.remaining for f in waiting if f.remaining <= SHORT]
        prompts = self.costs.prompt_budget(self.decode_stretch, len(short), len(waiting)) if short else None
        return self.max_batched_tokens if prompts is None else min(self.max_batched_tokens, sum(short) + prompts)

    async def _gather_returning(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sessions whose feeds the last pass finished usually send their next one at once (after their
        distribution is built and the coordinator decides): wait for them a little (a tenth of a pass, at
        most RETURN_WINDOW_S), so they ride in the next pass together instead of splitting it in two."""
        returning, self._returning = self._returning, set()
        deadline = loop.time() + min(RETURN_WINDOW_S, 0.1 * self._last_pass_s)
        while returning - {id(f.kv) for f in self._waiting} and (left := deadline - loop.time()) > 0:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), left)

    async def _wait_for_blocks(self, waiting: list[Feed]) -> None:
        """No feed could get blocks: wait for some to free; feeds that waited past kv_wait fail."""
        now = time.perf_counter()
        for feed in waiting:
            if now - feed.queued_at > self.kv_wait_s and not feed.future.done():
                feed.future.set_exception(
                    OutOfBlocks(
                        f"{self._name}: the KV cache has no room for {feed.remaining} more tokens of this session "
                        f"(waited {self.kv_wait_s:.1f} s for running sessions to free blocks); retry later"
                    )
                )
        self.blocks_freed.clear()
        self._wakeup.clear()
        wake = asyncio.ensure_future(self._wakeup.wait())
        freed = asyncio.ensure_future(self.blocks_freed.wait())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait((wake, freed), timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
        wake.cancel()
        freed.cancel()

    def _count_evictions(self) -> None:
        evictions = self.kv.evictions
        if evictions > self._evictions:
            metrics.PREFIX_CACHE_EVICTIONS.labels(self._name).inc(evictions - self._evictions)
            self._evictions = evictions

    def _record(self, s: Slice, rows: dict[int, torch.Tensor], compute_ms: float, batch: int) -> None:
        feed = s.feed
        if feed.future.done():  # cancelled during the pass: its session may already be closed
            return
        feed.kv.ids.extend(s.tokens)
        for key, row in rows.items():
            if isinstance(key, tuple):
                feed.kv.branch_rows[key] = row
            else:
                feed.kv.rows[key] = row
        self.kv.register_full_blocks(feed.kv)
        self.kv.trim_windows(feed.kv)
        feed.done += len(s.tokens)
        feed.compute_ms += compute_ms
        feed.batch_size = batch
        if feed.remaining == 0:
            self._finish(feed)

    def _finish(self, feed: Feed) -> None:
        if feed.future.done():
            return
        queue_ms = ((feed.started_at or time.perf_counter()) - feed.queued_at) * 1e3
        computed = len(feed.ids) - feed.cached
        feed.future.set_result(PassStats(computed, feed.batch_size, queue_ms, feed.compute_ms, feed.position))

    def _run(self, slices: list[Slice]) -> list[dict[int, torch.Tensor]]:
        """One forward pass over the slices (in the forward thread)."""
        return self.runner.run(slices)
