"""Run the steps of concurrent sessions as shared forward passes.

Steps that arrive while a pass runs wait and go together into the next one (continuous
batching). Their caches are left-padded to one length and masked. Short feeds (decodes, and the
catch-ups of a few tokens that canonical re-tokenization and token healing cause) share one pass,
right-padded to the longest and masked; longer feeds (prefills) share a pass with feeds of the
same length only, so a decode never pays for a long prefill's padding.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from model_worker import metrics
from model_worker.kv_state import ROWS_KEPT, KVState

# Feeds of at most this many tokens share a pass, right-padded; longer ones only with equal lengths.
MIX_UP_TO = 8


@dataclass
class PassStats:
    tokens_fed: int
    batch_size: int
    queue_ms: float
    compute_ms: float


@dataclass
class _Job:
    state: KVState
    new_ids: list[int]
    rows: int  # output rows wanted (the last ones)
    future: asyncio.Future[PassStats]
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, model: Any, device: torch.device, name: str = "model", max_batch: int = 64) -> None:
        self._model = model
        self._name = name
        self._device = device
        self._max_batch = max_batch
        self._pending: list[_Job] = []
        self._wakeup = asyncio.Event()
        # One thread runs the model, so the event loop stays free to take new steps.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def forward(self, state: KVState, new_ids: list[int], rows: int = ROWS_KEPT) -> PassStats:
        """Feed new_ids after the state's cached tokens, keeping the outputs of the last `rows`;
        the state is updated in place."""
        future: asyncio.Future[PassStats] = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(state, new_ids, min(max(rows, 1), len(new_ids)), future))
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            jobs = [j for j in self._pending if not j.future.done()]
            self._pending = []
            metrics.QUEUE_DEPTH.labels(self._name).set(len(jobs))
            groups: dict[int, list[_Job]] = defaultdict(list)
            for job in jobs:
                groups[0 if len(job.new_ids) <= MIX_UP_TO else len(job.new_ids)].append(job)
            for group in groups.values():
                for i in range(0, len(group), self._max_batch):
                    chunk = [j for j in group[i : i + self._max_batch] if not j.future.done()]
                    if not chunk:
                        continue
                    started = time.perf_counter()
                    try:
                        await loop.run_in_executor(self._executor, self._run, chunk)
                    except Exception as exc:
                        for job in chunk:
                            if not job.future.done():
                                job.future.set_exception(exc)
                        continue
                    compute_ms = (time.perf_counter() - started) * 1e3
                    metrics.STEP_LATENCY.labels(self._name).observe(compute_ms / 1e3)
                    metrics.BATCH_SIZE.labels(self._name).observe(len(chunk))
                    for job in chunk:
                        if not job.future.done():
                            queue_ms = (started - job.queued_at) * 1e3
                            job.future.set_result(PassStats(len(job.new_ids), len(chunk), queue_ms, compute_ms))

    @torch.inference_mode()
    def _run(self, jobs: list[_Job]) -> None:
        feeds = [len(j.new_ids) for j in jobs]
        n = max(feeds)
        lengths = [len(j.state.ids) for j in jobs]
        longest = max(lengths)
        input_ids = torch.tensor([j.new_ids + [0] * (n - f) for j, f in zip(jobs, feeds, strict=True)],
                                 dtype=torch.long, device=self._device)  # fmt: skip
        positions = torch.tensor([[length + i for i in range(n)] for length in lengths], device=self._device)
        kwargs: dict[str, Any] = {}
        if longest:
            kwargs["past_key_values"] = DynamicCache(ddp_cache_data=_stack_caches(jobs, lengths, longest))
        if any(length != longest for length in lengths) or any(f != n for f in feeds):
            mask = torch.ones(len(jobs), longest + n, dtype=torch.long, device=self._device)
            for row, (length, f) in enumerate(zip(lengths, feeds, strict=True)):
                mask[row, : longest - length] = 0  # left padding of the cache
                mask[row, longest + f :] = 0  # right padding of the feed
            kwargs["attention_mask"] = mask
        # Output rows wanted: each job's last `rows` real positions (the same for every job when uniform).
        wanted = sorted({p for j, f in zip(jobs, feeds, strict=True) for p in range(f - j.rows, f)})
        uniform = all(f == n for f in feeds) and len({j.rows for j in jobs}) == 1
        keep: int | torch.Tensor = jobs[0].rows if uniform else torch.tensor(wanted, device=self._device)
        out = self._model(input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=keep, **kwargs)
        cache = out.past_key_values
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        column = {p: c for c, p in enumerate(wanted)}
        for row, (job, length, f) in enumerate(zip(jobs, lengths, feeds, strict=True)):
            start = longest - length  # left padding of this row
            end = longest + f  # right padding of this row's feed is dropped
            own = [(k[row : row + 1, :, start:end], v[row : row + 1, :, start:end]) for k, v in layers]
            logits = out.logits[row] if uniform else out.logits[row, [column[p] for p in range(f - job.rows, f)]]
            job.state.extend(job.new_ids, own, logits.float())


def _stack_caches(jobs: list[_Job], lengths: list[int], longest: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Left-pad every session's cache to the longest and stack them into one batch."""
    template = next(j.state.layers for j in jobs if j.state.layers is not None)
    if len(jobs) == 1:
        return list(template)
    stacked = []
    for layer, (k0, v0) in enumerate(template):
        keys, values = [], []
        for job, length in zip(jobs, lengths, strict=True):
            pad = longest - length
            if job.state.layers is None:
                k = k0.new_zeros(1, k0.shape[1], longest, k0.shape[3])
                v = v0.new_zeros(1, v0.shape[1], longest, v0.shape[3])
            else:
                k, v = job.state.layers[layer]
                if pad:
                    k = torch.nn.functional.pad(k, (0, 0, pad, 0))
                    v = torch.nn.functional.pad(v, (0, 0, pad, 0))
            keys.append(k)
            values.append(v)
        stacked.append((torch.cat(keys), torch.cat(values)))
    return stacked
