"""Load test: many concurrent clients against a local cluster for a while; errors, latency, memory.

    python scripts/load_test.py [--config configs/default.yaml] [--clients 64] [--seconds 60]
                                [--warmup 5] [--max-growth 0.10]

Starts the config's workers and a coordinator, each in its own process (`chorus coordinator
--port 0 --worker NAME=ADDRESS ...`, so the memory measured is the server's, not this process's
clients'), loads them with `--clients` concurrent SDK clients for `--warmup` seconds (caches and
allocator pools fill), then for `--seconds`, and reports requests, errors by status, p50/p99
latency and the resident memory of the coordinator and each worker after the warm-up and at the
end. Exits 1 on any unexpected error (RESOURCE_EXHAUSTED is expected past capacity: it tells
clients to back off) or if any process's resident memory grew by more than `--max-growth`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import chorus
from coordinator import cluster
from coordinator.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"chorus serving on \S+:(\d+)")


def _rss_mb(pids: dict[str, int]) -> dict[str, float]:
    return {name: psutil.Process(pid).memory_info().rss / 2**20 for name, pid in pids.items()}


async def _client(target: str, until: float, max_new: int, seed: int, latencies: list[float], codes: Counter) -> None:
    rng = random.Random(seed)
    async with chorus.AsyncClient(target, timeout=60) as client:
        while time.monotonic() < until:
            a, b = rng.randrange(100), rng.randrange(100)
            started = time.perf_counter()
            try:
                await client.generate(prompt=f"{a}+{b}=", max_new_tokens=max_new)
                codes["OK"] += 1
                latencies.append(time.perf_counter() - started)
            except chorus.ChorusError as exc:
                codes[exc.code.name] += 1
                if isinstance(exc, chorus.ResourceExhausted):
                    await asyncio.sleep(0.05)  # back off, as a client should


def _start_coordinator(config_path: str, addresses: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    """`chorus coordinator` over the running workers, on a free port; returns the process and its port."""
    command = [sys.executable, "-c", "import sys; from chorus.cli import main; sys.exit(main())",
               "--log-level", "WARNING", "coordinator", "--config", config_path, "--port", "0", "--grace", "5",
               *(f"--worker={name}={address}" for name, address in addresses.items())]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    match = None
    for line in process.stdout:  # ends when it exits without serving
        match = SERVING.search(line)
        if match:
            break
    if match is None:
        process.kill()
        raise RuntimeError(f"the coordinator did not start (exit code {process.wait()})")
    # Keep draining its stdout so a full pipe never blocks it.
    threading.Thread(target=shutil.copyfileobj, args=(process.stdout, sys.stderr), daemon=True).start()
    return process, int(match.group(1))


async def _load(target: str, args: argparse.Namespace, seconds: float) -> tuple[list[float], Counter]:
    latencies: list[float] = []
    codes: Counter = Counter()
    until = time.monotonic() + seconds
    await asyncio.gather(
        *(_client(target, until, args.max_new_tokens, i, latencies, codes) for i in range(args.clients))
    )
    return latencies, codes


async def _run(args: argparse.Namespace, target: str, pids: dict[str, int]) -> tuple[dict[str, object], Counter]:
    async with chorus.AsyncClient(target) as warm:
        for _ in range(20):
            await warm.generate(prompt="1+1=", max_new_tokens=args.max_new_tokens)
    _, warmup_codes = await _load(target, args, args.warmup)  # fills caches and allocator pools
    before = _rss_mb(pids)
    latencies, codes = await _load(target, args, args.seconds)
    after = _rss_mb(pids)
    latencies.sort()

    def pct(p: float) -> float:
        return 1e3 * latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    report = {
        "clients": args.clients,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "requests": sum(codes.values()),
        "by_status": dict(codes),
        "requests_per_s": round(codes["OK"] / args.seconds, 1),
        "p50_ms": round(pct(0.50), 1),
        "p99_ms": round(pct(0.99), 1),
        "rss_mb_before": {k: round(v, 1) for k, v in before.items()},
        "rss_mb_after": {k: round(v, 1) for k, v in after.items()},
        "rss_growth_pct": {k: round(100 * (after[k] - before[k]) / before[k], 1) for k in before},
    }
    return report, warmup_codes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the first memory reading")
    parser.add_argument("--max-growth", type=float, default=0.10, help="largest allowed RSS growth (0.10 = 10%%)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    config = load_config(args.config)
    workers = cluster.spawn_workers(config)
    coordinator = None
    try:
        addresses = dict(zip(config.model_names, cluster.addresses(config, workers), strict=True))
        coordinator, port = _start_coordinator(str(Path(args.config).resolve()), addresses)
        pids = {"coordinator": coordinator.pid, **{w.spec.name: w.process.pid for w in workers}}
        report, warmup_codes = asyncio.run(_run(args, f"127.0.0.1:{port}", pids))
    finally:
        if coordinator is not None and coordinator.poll() is None:
            coordinator.terminate()
            try:
                coordinator.wait(30)
            except subprocess.TimeoutExpired:
                coordinator.kill()
                coordinator.wait()
        for w in workers:
            w.stop()
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = False
    expected = ("OK", "RESOURCE_EXHAUSTED")
    for phase, codes in (("warm-up", warmup_codes), ("run", report["by_status"])):
        unexpected = {k: v for k, v in codes.items() if k not in expected}  # type: ignore[union-attr]
        if unexpected:
            print(f"unexpected errors during the {phase}: {unexpected}", file=sys.stderr)
            failed = True
    grown = {k: v for k, v in report["rss_growth_pct"].items() if v > 100 * args.max_growth}  # type: ignore[union-attr]
    if grown:
        print(f"resident memory grew more than {100 * args.max_growth:g}%: {grown}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
