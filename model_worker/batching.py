"""Run the steps of concurrent sessions as shared forward passes.

Steps that arrive while a pass runs wait and go together into the next one (continuous
batching). Sessions feeding the same number of tokens share a pass: their caches are
left-padded to one length and masked, so every query row is a real token.
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
            groups: dict[tuple[int, int], list[_Job]] = defaultdict(list)
            for job in jobs:
                groups[len(job.new_ids), job.rows].append(job)
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
        n = len(jobs[0].new_ids)
        lengths = [len(j.state.ids) for j in jobs]
        longest = max(lengths)
        input_ids = torch.tensor([j.new_ids for j in jobs], dtype=torch.long, device=self._device)
        positions = torch.tensor([[length + i for i in range(n)] for length in lengths], device=self._device)
        kwargs: dict[str, Any] = {}
        if longest:
            kwargs["past_key_values"] = DynamicCache(ddp_cache_data=_stack_caches(jobs, lengths, longest))
        if any(length != longest for length in lengths):
            mask = torch.ones(len(jobs), longest + n, dtype=torch.long, device=self._device)
            for row, length in enumerate(lengths):
                mask[row, : longest - length] = 0
            kwargs["attention_mask"] = mask
        out = self._model(
            input_ids=input_ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=jobs[0].rows,
            **kwargs,
        )
        cache = out.past_key_values
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for row, (job, length) in enumerate(zip(jobs, lengths, strict=True)):
            start = longest - length  # left padding of this row
            own = [(k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in layers]
            job.state.extend(job.new_ids, own, out.logits[row].float())


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
