"""A local cluster: one worker process per model plus a coordinator (what `chorus up` runs).

`LocalWorkers` owns the worker processes and restarts one that dies, with exponential backoff (as
a Kubernetes Deployment would), on the same port where it is free; coordinators attached to it
drop a dead worker's replica at once (its model is not ready: new requests get UNAVAILABLE with a
retry hint) and take it back, with fresh Info, once the restarted worker serves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient
from tqdm import tqdm

from chorus_common.worker_args import WorkerArgs
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


class SpawnCancelled(Exception):
    """spawn_worker's `cancel` was set while the worker loaded; the process was killed."""


class WorkerStartFailed(RuntimeError):
    """The worker process exited before it served."""

    def __init__(self, message: str, pid: int, returncode: int) -> None:
        super().__init__(message)
        self.pid = pid
        self.returncode = returncode


def spawn_worker(
    spec: ModelSpec,
    host: str = "127.0.0.1",
    timeout: float = 600.0,
    threads: int | None = None,
    metrics_port: int | None = None,
    port: int = 0,
    options: Mapping[str, Any] | None = None,
    cancel: threading.Event | None = None,
) -> WorkerProcess:
    """Start `python -m model_worker` for spec and wait until it serves (threads: OpenMP threads;
    options: WorkerArgs fields over the spec's). Setting `cancel` while it loads kills it and raises
    SpawnCancelled."""
    port_dir = Path(tempfile.mkdtemp(prefix="chorus-worker-"))
    try:
        port_file = port_dir / "port"
        args = worker_args(
            spec, host=host, port=port, metrics_port=metrics_port, port_file=port_file, **(options or {})
        )
        return _spawn(spec, args, port_file, timeout, threads, cancel)
    finally:
        shutil.rmtree(port_dir, ignore_errors=True)


def worker_args(spec: ModelSpec, **options: Any) -> WorkerArgs:
    """The worker settings a model's config entry gives, with options (WorkerArgs fields) over them."""
    if spec.path is None:
        raise ValueError(f"model {spec.name!r}: no path to start a worker from (the config gives none)")
    max_memory = {str(k): v for k, v in spec.max_memory.items()} if spec.max_memory else None
    given = {
        "model": spec.path,
        "name": spec.name,
        "device": spec.device,
        "dtype": spec.dtype,
        "quantization": spec.quantization,
        "max_memory": max_memory,
        "max_model_len": spec.max_model_len,
        "kv_budget_mib": spec.kv_budget_mib,
    }
    return WorkerArgs(**{**given, **options})


def _spawn(
    spec: ModelSpec,
    args: WorkerArgs,
    port_file: Path,
    timeout: float,
    threads: int | None,
    cancel: threading.Event | None,
) -> WorkerProcess:
    command = [sys.executable, "-m", "model_worker", *args.to_argv()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text():
        if process.poll() is not None:
            message = f"worker {spec.name} {describe_exit(process.returncode)} while loading"
            raise WorkerStartFailed(message, process.pid, process.returncode)
        if cancel is not None and cancel.is_set():
            process.kill()
            process.wait()
            raise SpawnCancelled(f"worker {spec.name}: stopped while loading")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise TimeoutError(f"worker {spec.name} did not start within {timeout:.0f} s")
        time.sleep(0.05)
    return WorkerProcess(spec, process, f"{args.host}:{port_file.read_text()}")


def describe_exit(returncode: int) -> str:
    """How a process ended, from its return code ("exited with code 1", "was killed by SIGKILL")."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _cpu_threads(specs: list[ModelSpec]) -> int | None:
    """OpenMP threads for each CPU worker: workers sharing the CPU split its cores (oversubscribed
    OpenMP threads spin, and made a two-model step here 4x slower than either model alone)."""
    on_cpu = sum(m.device == "cpu" for m in specs)
    return max(1, (os.cpu_count() or 1) // on_cpu) if on_cpu > 1 else None


def spawn_workers(config: EnsembleConfig, host: str = "127.0.0.1") -> list[WorkerProcess]:
    """Start a worker for every model without an address, all loading in parallel."""
    specs = [m for m in config.models if m.address is None]
    threads = _cpu_threads(specs)
    started: list[WorkerProcess] = []
    futures: list[Future[WorkerProcess]] = []
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
        # The pool waited for the others to load: stop every worker that did, not only those seen.
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().stop()
        raise
    return started


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead worker is started again: after initial_delay_s, doubling (multiplier) with every
    further death in a row, at most max_delay_s; a worker that served reset_after_s or longer before
    it died starts the schedule over (as Kubernetes' CrashLoopBackOff, with shorter times)."""

    initial_delay_s: float = 1.0
    multiplier: float = 2.0
    max_delay_s: float = 30.0
    reset_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """The wait before the restart that follows the failures-th death in a row (1, 2, ...)."""
        return min(self.max_delay_s, self.initial_delay_s * self.multiplier ** max(0, failures - 1))


@dataclass(frozen=True)
class WorkerEvent:
    """What the supervisor saw happen to a worker: it "started" (serves: the first start, or a
    restart), or it "exited" (returncode, after serving ran_s seconds, 0 if it died while loading;
    failures in a row, and the wait delay_s before its next start)."""

    kind: str  # "started" | "exited"
    model: str
    pid: int
    at: float  # time.monotonic()
    address: str = ""
    returncode: int | None = None
    ran_s: float = 0.0
    failures: int = 0
    delay_s: float = 0.0


@dataclass
class _Slot:
    """One model's worker, as supervised: its latest process and address (`up` while it serves)."""

    spec: ModelSpec
    threads: int | None
    worker: WorkerProcess
    address: str
    up: bool = True
    served_since: float = field(default_factory=time.monotonic)
    failures: int = 0
    thread: threading.Thread | None = None


_NOTIFY_TIMEOUT_S = 60.0  # for an ensemble to take a worker's change (a join fetches Info and vocabulary)


class LocalWorkers:
    """The worker processes of a local cluster (one per model without an address), supervised:
    a thread per worker waits on its process; when it dies (crash, OOM kill, SIGKILL) the death is
    logged, every attached ensemble drops its replica at once, and it is started again after the
    policy's backoff, on its old port if that is free (else on a new one), until it serves; then the
    attached ensembles take it back (fresh Info). A worker that fails to start at first is an error."""

    def __init__(self, config: EnsembleConfig, host: str = "127.0.0.1", policy: RestartPolicy | None = None) -> None:
        self.config = config
        self.host = host
        self.policy = policy or RestartPolicy()
        self.events: deque[WorkerEvent] = deque(maxlen=1000)  # the latest, oldest first
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._attached: list[tuple[Ensemble, asyncio.AbstractEventLoop]] = []

    def start(self) -> None:
        """Start every worker (all loading in parallel) and watch them; raises if one fails to start."""
        started = spawn_workers(self.config, self.host)
        threads = _cpu_threads([w.spec for w in started])
        for w in started:
            slot = _Slot(w.spec, threads if w.spec.device == "cpu" else None, w, w.address)
            self._slots.append(slot)
            self._record("started", slot, w)
            log.info(
                "worker %s started (pid %d) on %s",
                w.spec.name,
                w.process.pid,
                w.address,
                extra=self._extra("worker_started", w),
            )
        for slot in self._slots:
            slot.thread = threading.Thread(
                target=self._watch, args=(slot,), name=f"watch-{slot.spec.name}", daemon=True
            )
            slot.thread.start()

    @property
    def addresses(self) -> list[str]:
        """Every model's worker address now, in config order (the config's own where it gives one)."""
        spawned = {s.spec.name: s.address for s in self._slots}
        return [m.address or spawned[m.name] for m in self.config.models]

    @property
    def workers(self) -> dict[str, WorkerProcess]:
        """The processes serving now, by model (a model whose worker is down is missing)."""
        with self._lock:
            return {s.spec.name: s.worker for s in self._slots if s.up}

    async def attach(self, ensemble: Ensemble) -> Callable[[], None]:
        """Keep ensemble's replicas of these workers in step with them, from now on; call it on the
        ensemble's event loop. Returns the function that detaches it."""
        entry = (ensemble, asyncio.get_running_loop())
        with self._lock:
            self._attached.append(entry)
            live = {s.spec.name: s.address if s.up else None for s in self._slots}
        for member in ensemble.members:
            name = member.spec.name
            if name not in live:
                continue  # a model with an address of its own: not ours
            for stale in [a for a in member.replicas if a != live[name]]:
                await ensemble.remove_worker(name, stale)
            address = live[name]
            if address is not None and address not in member.replicas:
                await ensemble.add_worker(name, address)

        def detach() -> None:
            with self._lock:
                if entry in self._attached:
                    self._attached.remove(entry)

        return detach

    def stop(self, timeout: float = 10.0) -> None:
        """Stop supervising and stop every worker (one loading for a restart is killed)."""
        self._stopping.set()
        with self._lock:  # a restart that ends after this sees _stopping and stops its worker itself
            workers = [s.worker for s in self._slots]
        for w in workers:
            w.stop(timeout)
        for slot in self._slots:
            if slot.thread is not None:
                slot.thread.join(timeout)

    def _watch(self, slot: _Slot) -> None:
        name = slot.spec.name
        while True:
            worker = slot.worker
            returncode = worker.process.wait()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            ran = now - slot.served_since
            with self._lock:
                slot.up = False
            if ran >= self.policy.reset_after_s:
                slot.failures = 0  # it served long enough: a fresh start, not a crash loop
            slot.failures += 1
            delay = self.policy.delay(slot.failures)
            self._record("exited", slot, worker, returncode=returncode, ran_s=ran, delay_s=delay, at=now)
            log.error(
                "worker %s (pid %d) %s after serving %.1f s; restarting in %.1f s (%d in a row)",
                name,
                worker.process.pid,
                describe_exit(returncode),
                ran,
                delay,
                slot.failures,
                extra={
                    **self._extra("worker_died", worker),
                    "exit": describe_exit(returncode),
                    "returncode": returncode,
                    "restart_in_s": delay,
                    "failures": slot.failures,
                },
            )
            self._tell(name, lambda e, address=worker.address: e.remove_worker(name, address))
            restarted = self._restart(slot, delay)
            if restarted is None:
                return
            with self._lock:
                stopping = self._stopping.is_set()
                if not stopping:
                    slot.worker, slot.address, slot.up = restarted, restarted.address, True
                    slot.served_since = time.monotonic()
            if stopping:
                restarted.stop()
                return
            self._record("started", slot, restarted)
            log.info(
                "worker %s restarted (pid %d) on %s",
                name,
                restarted.process.pid,
                restarted.address,
                extra=self._extra("worker_restarted", restarted),
            )
            self._tell(name, lambda e, address=restarted.address: e.add_worker(name, address))

    def _restart(self, slot: _Slot, delay: float) -> WorkerProcess | None:
        """Start slot's worker again after delay, retrying (with growing delays) until it serves;
        None once stopping."""
        name = slot.spec.name
        while not self._stopping.wait(delay):
            port = int(slot.address.rsplit(":", 1)[1])
            if not _port_free(self.host, port):
                log.warning("worker %s: port %d is taken; restarting it on a new port", name, port)
                port = 0
            try:
                return spawn_worker(slot.spec, self.host, threads=slot.threads, port=port, cancel=self._stopping)
            except SpawnCancelled:
                return None
            except (RuntimeError, TimeoutError, OSError) as exc:
                slot.failures += 1
                delay = self.policy.delay(slot.failures)
                pid, returncode = (exc.pid, exc.returncode) if isinstance(exc, WorkerStartFailed) else (0, None)
                self._record("exited", slot, None, pid=pid, returncode=returncode, delay_s=delay)
                log.error(
                    "%s; restarting it in %.1f s (%d in a row)",
                    exc,
                    delay,
                    slot.failures,
                    extra={
                        "event": "worker_died",
                        "model": name,
                        "pid": pid,
                        "returncode": returncode,
                        "restart_in_s": delay,
                        "failures": slot.failures,
                    },
                )
        return None

    def _tell(self, model: str, change: Callable[[Ensemble], Coroutine[Any, Any, None]]) -> None:
        """Apply change to every attached ensemble serving model, on its loop, in order."""
        with self._lock:
            targets = list(self._attached)
        for ensemble, loop in targets:
            if model not in ensemble.config.model_names:
                continue
            try:
                asyncio.run_coroutine_threadsafe(change(ensemble), loop).result(_NOTIFY_TIMEOUT_S)
            except Exception as exc:  # a closed loop, or a join that failed: the worker is logged, not lost
                log.warning("worker %s: the coordinator did not take the change: %r", model, exc)

    def _record(self, kind: str, slot: _Slot, worker: WorkerProcess | None, **fields: Any) -> None:
        fields.setdefault("at", time.monotonic())
        if worker is not None:
            fields.update(pid=worker.process.pid, address=worker.address)
        event = WorkerEvent(kind, slot.spec.name, failures=slot.failures, **{"pid": 0, **fields})
        with self._lock:
            self.events.append(event)

    @staticmethod
    def _extra(event: str, worker: WorkerProcess) -> dict[str, Any]:
        return {"event": event, "model": worker.spec.name, "pid": worker.process.pid, "address": worker.address}


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (connections of the dead one in TIME_WAIT
    do not count; another listener does)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@contextmanager
def supervised_workers(
    config: EnsembleConfig, host: str = "127.0.0.1", policy: RestartPolicy | None = None
) -> Iterator[LocalWorkers]:
    """Run the config's spawned workers, restarted when they die, for the block (what `chorus up` and
    `chorus demo` use; pass it to start_coordinator so the coordinator follows deaths and restarts)."""
    workers = LocalWorkers(config, host, policy)
    try:
        workers.start()
        yield workers
    finally:
        workers.stop()


@contextmanager
def local_workers(config: EnsembleConfig, host: str = "127.0.0.1") -> Iterator[list[str]]:
    """Run the config's spawned workers (supervised) for the block; yields every model's address in
    config order."""
    with supervised_workers(config, host) as workers:
        yield workers.addresses


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
    detach: Callable[[], None] | None = None  # from LocalWorkers.attach

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace: float = 5.0) -> None:
        if self.detach is not None:
            self.detach()
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
    workers: LocalWorkers | None = None,
) -> RunningCoordinator:
    """Serve config's ensemble: over fixed worker addresses, or over pods found in Kubernetes.
    With `workers` (the local cluster's), the ensemble follows their deaths and restarts."""
    bind = f"{config.server.host}:{config.server.port if port is None else port}"
    discovery = None
    detach = None
    if config.discovery.mode == "kubernetes":
        ensemble = Ensemble.from_config(config)  # NOT_SERVING until every model has a ready pod
    else:
        ensemble = await connect(config, worker_addresses or [])
    if workers is not None:
        detach = await workers.attach(ensemble)
    server = CoordinatorServer(ensemble, bind)
    await server.start()
    if config.discovery.mode == "kubernetes":
        discovery = KubernetesDiscovery(ensemble, config.discovery, api_client)
        discovery.start()
    http = None
    if config.http.enabled:
        http = HttpApi(ensemble, server.admission)
        await http.start(config.http.host, config.http.port)
    return RunningCoordinator(ensemble, server, discovery, http, detach)
