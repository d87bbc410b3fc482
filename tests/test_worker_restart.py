"""A local cluster's worker that dies is restarted with backoff, and the coordinator follows it:
refusing with a retry hint while it is down, using it again once it is back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

import chorus
from chorus_local import cluster
from chorus_local.cluster import LocalWorkers, RestartPolicy, WorkerEvent
from coordinator.config import parse_config
from coordinator.server import RETRY_AFTER_S
from tests.cluster_helpers import MODELS, ROOT, LoopThread

T = TypeVar("T")


def _until(check: Callable[[], T], timeout: float, what: str) -> T:
    """check()'s first truthy value, polled until timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)


def _is_ready(client: chorus.Client) -> bool:
    return client.models().ready


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_restart_delays_double_up_to_the_cap() -> None:
    assert [RestartPolicy().delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    policy = RestartPolicy(initial_delay_s=0.5, multiplier=3, max_delay_s=10)
    assert [policy.delay(n) for n in range(1, 5)] == [0.5, 1.5, 4.5, 10]


class _Output:
    """A process's output lines, read in a thread; JSON log records parsed."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)

    def records(self, event: str, model: str) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == event and record.get("model") == model:
                    found.append(record)
        return found

    def serving_on(self) -> str | None:
        return next((line.split()[-1] for line in list(self.lines) if line.startswith("chorus serving on ")), None)


def test_chorus_up_restarts_a_killed_worker_and_serves_with_it_again(tmp_path: Path) -> None:
    """SIGKILL one worker of a running `chorus up`: requests are refused as not ready (UNAVAILABLE with
    a retry hint) until the restarted worker (a new process, on the same port) serves; then both
    models answer again. Stopping `chorus up` stops the restarted worker too."""
    config = tmp_path / "default.yaml"
    config.write_text((ROOT / "configs" / "default.yaml").read_text().replace("../models", str(MODELS)))
    up = subprocess.Popen(
        [sys.executable, "-m", "chorus.cli", "--log-format", "json", "up", "--config", str(config), "--port", "0"],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = _Output(up)
    pids: list[int] = []
    try:
        address = _until(lambda: output.serving_on() or up.poll() is not None, 180, "chorus up serving")
        assert isinstance(address, str), f"chorus up exited: {''.join(output.lines)[-3000:]}"
        (first,) = output.records("worker_started", "arith-sp")
        pids.append(first["pid"])
        with chorus.Client(address, timeout=60, retries=0) as client:
            assert client.generate(prompt="48+27=", max_new_tokens=4).text == "75"

            os.kill(first["pid"], signal.SIGKILL)
            (died,) = _until(lambda: output.records("worker_died", "arith-sp"), 30, "the death logged")
            assert died["pid"] == first["pid"]
            assert died["exit"] == "was killed by SIGKILL" and died["returncode"] == -signal.SIGKILL
            assert died["restart_in_s"] == RestartPolicy().initial_delay_s
            _until(lambda: not _is_ready(client), 30, "the coordinator seeing the worker down")
            assert not output.records("worker_restarted", "arith-sp"), "back before the first restart delay"
            with pytest.raises(chorus.Unavailable) as refused:
                client.generate(prompt="48+27=", max_new_tokens=4)
            assert "arith-sp" in refused.value.details and "no ready worker" in refused.value.details
            assert refused.value.retry_after == RETRY_AFTER_S

            _until(lambda: _is_ready(client), 120, "the restarted worker serving")
            (restarted,) = output.records("worker_restarted", "arith-sp")
            pids.append(restarted["pid"])
            assert restarted["pid"] != first["pid"] and not _gone(restarted["pid"])
            assert restarted["address"] == first["address"]  # its port was free: the same address
            result = client.generate(prompt="48+27=", max_new_tokens=4)
            assert result.text == "75"
            assert result.usage.lost_models == ()
            assert all(m.forward_passes > 0 for m in result.usage.models)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    for pid in pids:
        _until(lambda pid=pid: _gone(pid), 30, f"worker {pid} gone after chorus up stopped")


@contextmanager
def _local_cluster(loop: LoopThread, policy: RestartPolicy) -> Iterator[tuple[LocalWorkers, str]]:
    """arith-bpe alone, started and served as `chorus up` does (supervised, the coordinator attached)."""
    config = parse_config(
        {"models": [{"name": "arith-bpe", "path": str(MODELS / "arith-bpe")}], "server": {"port": 0}}, ROOT
    )
    with cluster.supervised_workers(config, policy=policy) as workers:
        running = loop.run(cluster.start_coordinator(config, workers.addresses, port=0, workers=workers))
        try:
            yield workers, f"127.0.0.1:{running.port}"
        finally:
            loop.run(running.stop(grace=0))


def _events(workers: LocalWorkers, kind: str) -> list[WorkerEvent]:
    return [e for e in list(workers.events) if e.kind == kind]


def _serve_past(workers: LocalWorkers, seconds: float) -> None:
    """Wait until the current worker has served `seconds`."""
    since = _events(workers, "started")[-1].at
    time.sleep(max(0.0, since + seconds + 0.1 - time.monotonic()))


def test_a_worker_that_keeps_dying_is_restarted_with_growing_capped_delays(
    loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed, then exiting at every start (its environment names a log format it refuses): the waits
    double up to the cap; meanwhile the model is not ready. Fixed, it comes back (its old port taken:
    on a new one, which the coordinator uses); a worker that served long enough starts the
    schedule over. Stopped while a restart is pending, no worker is left behind."""
    policy = RestartPolicy(initial_delay_s=0.1, multiplier=2.0, max_delay_s=0.5, reset_after_s=1.0)
    children_before = {c.pid for c in psutil.Process().children()}
    with _local_cluster(loop, policy) as (workers, target), chorus.Client(target, timeout=30, retries=0) as client:
        answer = client.generate(prompt="12+35=", max_new_tokens=4).text  # greedy: the same every time
        assert answer
        first = workers.workers["arith-bpe"]
        _serve_past(workers, policy.reset_after_s)
        monkeypatch.setenv("CHORUS_LOG_FORMAT", "unreadable")  # every start from now on exits at once
        os.kill(first.process.pid, signal.SIGKILL)

        _until(lambda: not _is_ready(client), 30, "the coordinator seeing the worker down")
        with pytest.raises(chorus.Unavailable) as refused:
            client.generate(prompt="12+35=", max_new_tokens=4, on_worker_loss="degrade")
        assert "arith-bpe" in refused.value.details and refused.value.retry_after == RETRY_AFTER_S
        _until(lambda: len(_events(workers, "exited")) >= 5, 60, "five deaths in a row")
        assert not _is_ready(client)

        port = int(first.address.rsplit(":", 1)[1])
        with socket.socket() as holder:  # someone else listens on its old port now
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", port))
            holder.listen()
            monkeypatch.delenv("CHORUS_LOG_FORMAT")  # fixed: the next start serves
            _until(lambda: len(_events(workers, "started")) == 2, 120, "the worker back")
            _until(lambda: _is_ready(client), 30, "the coordinator seeing the worker back")
            back = workers.workers["arith-bpe"]
            assert back.process.pid != first.process.pid and back.address != first.address
            assert client.models().models[0].addresses == (back.address,)
            assert client.generate(prompt="12+35=", max_new_tokens=4).text == answer

        _serve_past(workers, policy.reset_after_s)
        os.kill(back.process.pid, signal.SIGKILL)
        _until(lambda: _events(workers, "exited")[-1].pid == back.process.pid, 30, "the second death")
        events = list(workers.events)

    exits = [e for e in events if e.kind == "exited"]
    killed, *crashes, reset = exits
    assert killed.returncode == -signal.SIGKILL and killed.ran_s >= policy.reset_after_s
    assert all(e.returncode == 1 and e.ran_s == 0 and e.pid not in (0, first.process.pid) for e in crashes)
    delays = [e.delay_s for e in exits[:-1]]
    assert delays[:5] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])  # doubling, then capped
    assert all(d == pytest.approx(0.5) for d in delays[5:])  # a start begun before the fix failed too
    assert [e.failures for e in exits[:-1]] == list(range(1, len(exits)))
    # It served past reset_after_s before the second kill: the schedule starts over.
    assert reset.returncode == -signal.SIGKILL and reset.failures == 1 and reset.delay_s == pytest.approx(0.1)
    # Each start (or death while starting) came after the wait its predecessor's death asked for.
    for death, after in pairwise(events):
        if death.kind == "exited":
            assert after.at - death.at >= death.delay_s
    new_children = lambda: [c for c in psutil.Process().children() if c.pid not in children_before]  # noqa: E731
    _until(lambda: not new_children(), 30, "every worker stopped")
