from __future__ import annotations

from collections.abc import Iterator

import pytest

from chorus_local.cluster import WorkerProcess
from tests.cluster_helpers import MODELS, LoopThread, worker
from tests.helm import fetch_helm

pytest_plugins = ["tests.real_models"]  # the real models' fixtures: real, workers


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def default_workers() -> Iterator[dict[str, WorkerProcess]]:
    """The embedded default models, one worker process each (shared by the whole session)."""
    workers = {name: worker(MODELS / name, name) for name in ("arith-bpe", "arith-sp")}
    yield workers
    for w in workers.values():
        w.stop()


@pytest.fixture(scope="session")
def helm() -> str:
    """The real helm binary (tests/helm.py renders the chart with it)."""
    return fetch_helm()
