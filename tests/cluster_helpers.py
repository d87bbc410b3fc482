"""Real servers on localhost for the tests: worker processes and in-thread coordinators."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chorus.v1 import worker_pb2
from chorus_local.cluster import RunningCoordinator, WorkerProcess, spawn_worker, start_coordinator
from coordinator.config import EnsembleConfig, ModelSpec, parse_config
from coordinator.workers import WorkerClient

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


class LoopThread:
    """An asyncio loop in a background thread, so sync tests can drive async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def worker(path: Path, name: str) -> WorkerProcess:
    return spawn_worker(ModelSpec(name=name, path=str(path)), timeout=180, threads=1)


def make_config(workers: list[WorkerProcess], **top: Any) -> EnsembleConfig:
    """A config over running workers; extra top-level keys (strategy, threshold, ...) as given."""
    models = [
        {"name": w.spec.name, "path": w.spec.path, "address": w.address, **extra}
        for w, extra in zip(workers, top.pop("model_extras", [{}] * len(workers)), strict=True)
    ]
    return parse_config({"models": models, "server": {"port": 0}, **top}, ROOT)


@contextmanager
def coordinator(loop: LoopThread, config: EnsembleConfig) -> Iterator[str]:
    """Start a coordinator for config; yields its target address."""
    addresses = [m.address for m in config.models]
    running: RunningCoordinator = loop.run(start_coordinator(config, addresses, port=0))  # type: ignore[arg-type]
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        loop.run(running.stop(grace=0))


async def prefix_hit_tokens(address: str) -> int:
    """The tokens a worker has taken from its prefix cache so far (its Info report)."""
    client = WorkerClient(address)
    try:
        info: worker_pb2.ModelInfo = await client.stub.Info(worker_pb2.InfoRequest())
        return info.prefix_cache_hit_tokens
    finally:
        await client.close()
