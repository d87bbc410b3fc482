"""A local cluster: one worker process per model plus a coordinator (what `chorus up` runs)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kubernetes.client import ApiClient
from tqdm import tqdm

from coordinator.config import EnsembleConfig, ModelSpec
from coordinator.discovery import KubernetesDiscovery
from coordinator.ensemble import Ensemble, connect
from coordinator.http_api import HttpApi
from coordinator.server import CoordinatorServer

log = logging.getLogger(__name__)


@dataclass
class WorkerProcess:
    spec: ModelSpec
    process: subprocess.Popen[bytes]
    address: str

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn_worker(
    spec: ModelSpec,
    host: str = "127.0.0.1",
    timeout: float = 600.0,
    threads: int | None = None,
    metrics_port: int | None = None,
    port: int = 0,
    extra_args: tuple[str, ...] = (),
) -> WorkerProcess:
    """Start `python -m model_worker` for spec and wait until it serves (threads: OpenMP threads)."""
    port_file = Path(tempfile.mkdtemp(prefix="chorus-worker-")) / "port"
    command = [
        sys.executable, "-m", "model_worker",
        "--model", spec.path, "--name", spec.name, "--device", spec.device, "--dtype", spec.dtype,
        "--host", host, "--port", str(port), "--port-file", str(port_file),
    ]  # fmt: skip
    if metrics_port is not None:
        command += ["--metrics-port", str(metrics_port)]
    command += extra_args
    if spec.max_memory:
        command += ["--max-memory", json.dumps({str(k): v for k, v in spec.max_memory.items()})]
    if spec.max_model_len:
        command += ["--max-model-len", str(spec.max_model_len)]
    if spec.quantization != "none":
        command += ["--quantization", spec.quantization]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text():
        if process.poll() is not None:
            raise RuntimeError(f"worker {spec.name} exited with code {process.returncode} while loading")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"worker {spec.name} did not start within {timeout:.0f} s")
        time.sleep(0.05)
    return WorkerProcess(spec, process, f"{host}:{port_file.read_text()}")


def spawn_workers(config: EnsembleConfig, host: str = "127.0.0.1") -> list[WorkerProcess]:
    """Start a worker for every model without an address, all loading in parallel."""
    specs = [m for m in config.models if m.address is None]
    # Workers sharing the CPU split its cores: oversubscribed OpenMP threads spin and
    # made a two-model step here 4x slower than either model alone.
    on_cpu = sum(m.device == "cpu" for m in specs)
    threads = max(1, (os.cpu_count() or 1) // on_cpu) if on_cpu > 1 else None
    started: list[WorkerProcess] = []
    try:
        with (
            ThreadPoolExecutor(max_workers=max(1, len(specs))) as pool,
            tqdm(total=len(specs), desc="loading models", unit="model", disable=None) as bar,
        ):
            futures = [
                pool.submit(spawn_worker, s, host, threads=threads if s.device == "cpu" else None) for s in specs
            ]
            for future in as_completed(futures):
                started.append(future.result())
                bar.set_postfix_str(started[-1].spec.name)
                bar.update()
    except BaseException:
        for w in started:
            w.stop()
        raise
    return started


@contextmanager
def local_workers(config: EnsembleConfig, host: str = "127.0.0.1") -> Iterator[list[str]]:
    """Run the config's spawned workers for the block; yields every model's address in config order."""
    workers = spawn_workers(config, host)
    try:
        yield addresses(config, workers)
    finally:
        for w in workers:
            w.stop()


def addresses(config: EnsembleConfig, workers: list[WorkerProcess]) -> list[str]:
    """The worker address of every model, in config order."""
    spawned = {w.spec.name: w.address for w in workers}
    return [m.address or spawned[m.name] for m in config.models]


@dataclass
class RunningCoordinator:
    ensemble: Ensemble
    server: CoordinatorServer
    discovery: KubernetesDiscovery | None = None
    http: HttpApi | None = None

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace: float = 5.0) -> None:
        if self.discovery is not None:
            self.discovery.stop()
        if self.http is not None:
            self.http.admission.draining = True  # refuse new HTTP requests while gRPC drains
        await self.server.stop(grace)
        if self.http is not None:
            await self.http.stop()
        await self.ensemble.close()


async def start_coordinator(
    config: EnsembleConfig,
    worker_addresses: list[str] | None = None,
    port: int | None = None,
    api_client: ApiClient | None = None,
) -> RunningCoordinator:
    """Serve config's ensemble: over fixed worker addresses, or over pods found in Kubernetes."""
    bind = f"{config.server.host}:{config.server.port if port is None else port}"
    discovery = None
    if config.discovery.mode == "kubernetes":
        ensemble = Ensemble.from_config(config)  # NOT_SERVING until every model has a ready pod
    else:
        ensemble = await connect(config, worker_addresses or [])
    server = CoordinatorServer(ensemble, bind)
    await server.start()
    if config.discovery.mode == "kubernetes":
        discovery = KubernetesDiscovery(ensemble, config.discovery, api_client)
        discovery.start()
    http = None
    if config.http.enabled:
        http = HttpApi(ensemble, server.admission)
        await http.start(config.http.host, config.http.port)
    return RunningCoordinator(ensemble, server, discovery, http)
