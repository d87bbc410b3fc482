"""The worker's engine: a scheduler that runs the sessions' feeds as forward passes over slot storage.

Each feed (tokens to append to one session's cache, and the positions whose output rows it wants)
waits in a queue. Every round of the scheduler runs at most two passes:
- one *decode pass* over every waiting short feed (at most `mix_up_to` tokens: decodes, and the few
  tokens that canonical re-tokenization and healing add), left-padded to the longest, so a row's
  last token is always the pass's last column;
- one *prefill chunk* of at most `prefill_chunk` tokens of the oldest long feed.
So a decode never waits behind a whole prefill, only behind one chunk. Passes write into the
sessions' slots in place (kv_cache.py) and run in one thread, so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from chorus_common.worker_args import WorkerArgs
from model_worker import metrics
from model_worker.kv_cache import AttentionPattern, PassCache, PassLayout, SlotStorage, build_masks
from model_worker.kv_state import KVState


@dataclass
class PassStats:
    tokens_fed: int
    batch_size: int  # feeds in the (last) pass this feed rode in
    queue_ms: float  # from arrival to its first pass
    compute_ms: float  # in its passes
    queue_position: int  # feeds waiting ahead of it when it arrived


@dataclass
class Feed:
    """One session's tokens the scheduler runs (over several passes when it is a prompt)."""

    kv: KVState
    ids: list[int]
    want: set[int]  # absolute positions whose output rows are wanted
    future: asyncio.Future[PassStats]
    position: int
    queued_at: float = field(default_factory=time.perf_counter)
    done: int = 0  # tokens of ids already run
    started_at: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done


@dataclass(frozen=True)
class Slice:
    """The part of a feed one pass runs: tokens ids[a:b], starting at cache position `start`."""

    feed: Feed
    tokens: list[int]
    start: int
    want: list[int]  # wanted positions inside this slice


class Engine:
    def __init__(
        self,
        model: Any,
        device: torch.device,
        storage: SlotStorage,
        name: str = "model",
        prefill_chunk: int = WorkerArgs.prefill_chunk,
        mix_up_to: int = WorkerArgs.mix_up_to,
    ) -> None:
        self._model = model
        self._name = name
        self._device = device
        self.storage = storage
        self.pattern = AttentionPattern.of(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self._layers = int(config.num_hidden_layers)
        self.prefill_chunk = prefill_chunk
        self.mix_up_to = mix_up_to
        self._waiting: list[Feed] = []
        self._wakeup = asyncio.Event()
        # One thread runs the model, so the event loop stays free to take new steps and answer health checks.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._task: asyncio.Task[None] | None = None
        self.cached_tokens = 0  # over all sessions, kept by the runtime; read by metrics

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
        """One token through slot 0, outside any session: allocates the storage (fails early if it does
        not fit) and pays the first pass's one-off costs before the worker says it is ready."""
        slot = self.storage.acquire()
        assert slot is not None
        try:
            feed = Feed(KVState(slot), [0], {0}, None, 0)  # type: ignore[arg-type]
            self._run([Slice(feed, [0], 0, [0])])
        finally:
            self.storage.release(slot)

    async def forward(self, kv: KVState, new_ids: list[int], want: Collection[int]) -> PassStats:
        """Append new_ids to the session's cache; kv.rows then holds the output rows at the `want`
        positions that this feed computed (positions before len(kv.ids) are not recomputed)."""
        start = len(kv.ids)
        future: asyncio.Future[PassStats] = asyncio.get_running_loop().create_future()
        wanted = {p for p in want if start <= p < start + len(new_ids)}
        self._waiting.append(Feed(kv, list(new_ids), wanted, future, len(self._waiting)))
        metrics.QUEUE_DEPTH.labels(self._name).set(len(self._waiting))
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            self._waiting = [f for f in self._waiting if not f.future.done()]
            short = [f for f in self._waiting if f.remaining <= self.mix_up_to]
            long = [f for f in self._waiting if f.remaining > self.mix_up_to]
            passes = [self._decode_slices(group) for group in _dense_groups(short)]
            if long:
                feed = long[0]
                n = min(self.prefill_chunk, feed.remaining)
                passes.append([self._slice(feed, n)])
            for slices in passes:
                started = time.perf_counter()
                for s in slices:
                    if not s.feed.started_at:
                        s.feed.started_at = started
                try:
                    rows = await loop.run_in_executor(self._executor, self._run, slices)
                except Exception as exc:
                    for s in slices:
                        if not s.feed.future.done():
                            s.feed.future.set_exception(exc)
                    self._waiting = [f for f in self._waiting if not f.future.done()]
                    continue
                compute_ms = (time.perf_counter() - started) * 1e3
                metrics.STEP_LATENCY.labels(self._name).observe(compute_ms / 1e3)
                metrics.BATCH_SIZE.labels(self._name).observe(len(slices))
                for s, got in zip(slices, rows, strict=True):
                    self._record(s, got, compute_ms, len(slices))
            self._waiting = [f for f in self._waiting if not f.future.done()]
            metrics.QUEUE_DEPTH.labels(self._name).set(len(self._waiting))

    def _slice(self, feed: Feed, n: int) -> Slice:
        start = len(feed.kv.ids)
        tokens = feed.ids[feed.done : feed.done + n]
        return Slice(feed, tokens, start, sorted(p for p in feed.want if start <= p < start + n))

    def _decode_slices(self, feeds: list[Feed]) -> list[Slice]:
        return [self._slice(f, f.remaining) for f in feeds]

    def _record(self, s: Slice, rows: dict[int, torch.Tensor], compute_ms: float, batch: int) -> None:
        feed = s.feed
        feed.kv.ids.extend(s.tokens)
        feed.kv.rows.update(rows)
        feed.done += len(s.tokens)
        self.cached_tokens += len(s.tokens)
        feed.compute_ms += compute_ms
        feed.batch_size = batch
        if feed.remaining == 0 and not feed.future.done():
            queue_ms = (feed.started_at - feed.queued_at) * 1e3
            feed.future.set_result(PassStats(len(feed.ids), batch, queue_ms, feed.compute_ms, feed.position))

    @torch.inference_mode()
    def _run(self, slices: list[Slice]) -> list[dict[int, torch.Tensor]]:
        """One forward pass: the slices' slots form the view [lo, hi); feeds are left-padded to the longest."""
        slots = [s.feed.kv.slot for s in slices]
        lo, hi = min(slots), max(slots) + 1
        width = max(len(s.tokens) for s in slices)
        input_ids = torch.zeros(hi - lo, width, dtype=torch.long)
        q_pos = torch.zeros(hi - lo, width, dtype=torch.long)
        w_slot, w_pos, w_row, w_col = [], [], [], []
        for s, slot in zip(slices, slots, strict=True):
            n, row = len(s.tokens), slot - lo
            input_ids[row, width - n :] = torch.tensor(s.tokens)
            q_pos[row, width - n :] = torch.arange(s.start, s.start + n)
            w_slot += [slot] * n
            w_pos += range(s.start, s.start + n)
            w_row += [row] * n
            w_col += range(width - n, width)
        kv_len = max(s.start + len(s.tokens) for s in slices)
        if kv_len > self.storage.slot_tokens:
            raise RuntimeError(f"a feed reaches position {kv_len}, past the slot's {self.storage.slot_tokens} tokens")
        dev = self._device
        layout = PassLayout(
            lo, hi, kv_len, *(torch.tensor(x, dtype=torch.long, device=dev) for x in (w_slot, w_pos, w_row, w_col))
        )
        # Columns whose logits are wanted: with one row, exactly those; else the last k columns of every row.
        cols = {width - len(s.tokens) + (p - s.start): p for s in slices for p in s.want}
        first = min(cols, default=width - 1)
        keep: int | torch.Tensor
        if len(slices) == 1:
            order = sorted(cols)
            keep = torch.tensor(order, dtype=torch.long, device=dev)
        else:
            order = list(range(first, width))
            keep = width - first
        q_pos = q_pos.to(dev)
        out = self._model(
            input_ids=input_ids.to(dev),
            position_ids=q_pos,
            attention_mask=build_masks(self.pattern, q_pos, kv_len, self._model.dtype),
            cache=PassCache(self.storage, self._layers, layout),
            use_cache=True,
            logits_to_keep=keep,
        )
        logits = out.logits
        index = {c: i for i, c in enumerate(order)}
        result = []
        for s, slot in zip(slices, slots, strict=True):
            row = slot - lo
            got = {}
            for p in s.want:
                r = logits[row, index[width - len(s.tokens) + (p - s.start)]].float()
                got[p] = r.clone() if logits.shape[0] * logits.shape[1] > 1 else r
            result.append(got)
        return result


def _dense_groups(feeds: list[Feed]) -> list[list[Feed]]:
    """Split feeds into passes whose slot ranges are at least half used (dummy rows cost compute)."""
    if not feeds:
        return []
    feeds = sorted(feeds, key=lambda f: f.kv.slot)
    span = feeds[-1].kv.slot - feeds[0].kv.slot + 1
    if span <= 2 * len(feeds) or len(feeds) == 1:
        return [feeds]
    gaps = [feeds[i + 1].kv.slot - feeds[i].kv.slot for i in range(len(feeds) - 1)]
    cut = gaps.index(max(gaps)) + 1
    return _dense_groups(feeds[:cut]) + _dense_groups(feeds[cut:])
