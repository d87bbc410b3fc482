"""Load test: many concurrent clients against a local cluster for a while; errors, latency, memory.

    python scripts/load_test.py [--config configs/default.yaml] [--clients 64] [--seconds 60]

Starts the config's workers and a coordinator, drives `--clients` concurrent SDK clients with
addition prompts for `--seconds`, and reports requests, errors by status, p50/p99 latency and the
resident memory of the coordinator and each worker before and after. Exits 1 on any unexpected
error (RESOURCE_EXHAUSTED is expected past capacity: it tells clients to back off).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import chorus
from coordinator import cluster
from coordinator.config import load_config


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


async def _run(args: argparse.Namespace, addresses: list[str], pids: dict[str, int]) -> dict[str, object]:
    config = load_config(args.config)
    running = await cluster.start_coordinator(config, addresses, port=0)
    target = f"127.0.0.1:{running.port}"
    async with chorus.AsyncClient(target) as warm:
        for _ in range(20):
            await warm.generate(prompt="1+1=", max_new_tokens=args.max_new_tokens)
    before = _rss_mb(pids)
    latencies: list[float] = []
    codes: Counter = Counter()
    until = time.monotonic() + args.seconds
    await asyncio.gather(
        *(_client(target, until, args.max_new_tokens, i, latencies, codes) for i in range(args.clients))
    )
    after = _rss_mb(pids)
    await running.stop(grace=5)
    latencies.sort()

    def pct(p: float) -> float:
        return 1e3 * latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return {
        "clients": args.clients,
        "seconds": args.seconds,
        "requests": sum(codes.values()),
        "by_status": dict(codes),
        "requests_per_s": round(codes["OK"] / args.seconds, 1),
        "p50_ms": round(pct(0.50), 1),
        "p99_ms": round(pct(0.99), 1),
        "rss_mb_before": {k: round(v, 1) for k, v in before.items()},
        "rss_mb_after": {k: round(v, 1) for k, v in after.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    config = load_config(args.config)
    workers = cluster.spawn_workers(config)
    try:
        pids = {"coordinator": os.getpid(), **{w.spec.name: w.process.pid for w in workers}}
        report = asyncio.run(_run(args, cluster.addresses(config, workers), pids))
    finally:
        for w in workers:
            w.stop()
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    unexpected = {k: v for k, v in report["by_status"].items() if k not in ("OK", "RESOURCE_EXHAUSTED")}  # type: ignore[union-attr]
    if unexpected:
        print(f"unexpected errors: {unexpected}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
