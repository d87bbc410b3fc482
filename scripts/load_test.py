"""Load test: many concurrent clients against a local cluster for a while; errors, latency, memory.

    python scripts/load_test.py [--config configs/default.yaml] [--clients 64] [--seconds 60]
                                [--warmup 5] [--phases 4] [--max-growth 0.03]
                                [--prompt-tokens N] [--kv-budget-mib MIB] [--dtype bfloat16]
                                [--baseline]

Starts the config's workers and a coordinator, each in its own process (`chorus coordinator
--port 0 --worker NAME=ADDRESS ...`, so the memory measured is the server's, not this process's
clients'), loads them with `--clients` concurrent SDK clients for `--warmup` seconds, then for
`--seconds` split into `--phases` equal phases, and reports requests, errors by status, p50/p99
latency and the resident memory of the coordinator and each worker after the warm-up and after
each phase.

Memory: a process whose allocator pools and caches are still filling (numpy buffers of full
distributions, 262,144 floats for Gemma; gRPC's and glibc's arenas) grows in the first phases and
levels off; a leak grows by the same amount in every phase. Under load the resident memory also
swings with the buffers of the requests in flight, so it is read every half second and each phase's
lowest reading (its floor) is what is compared. The check is on the later half of the run: from
phase ceil(phases/2) to the last, each process's floor may grow by at most `--max-growth` (growth
since the warm-up is reported, not checked). Exits 1 on that, or on any unexpected error
(RESOURCE_EXHAUSTED is expected past capacity: it tells clients to back off). `--trace-memory` also
prints, after each phase, the coordinator's Python heap and where it grew most (tracemalloc).

Requests are short sums unless `--prompt-tokens N` sends prompts of about N tokens that no other request
shares: then the workers' prefix caches fill, and on a CPU each worker grows to about its idle size plus its
KV pool (`--kv-budget-mib`, over the config's `kv_budget_mib`) before levelling off (docs/load-test.md).

`--baseline` then measures what each model takes in transformers alone, in a fresh process once the cluster
has stopped: its tokenizer and its model loaded as the worker loads them (same directory, dtype, one CPU
thread), `generate` greedy on the warm-up's prompt, then garbage collected and the heap trimmed; the report
gives that resident memory beside the worker's highest floor (`worker_floor_over_transformers_alone`). It is
the floor of the stack the worker is built on, one sequence at a time with nothing kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import chorus
from chorus_local import cluster
from coordinator.config import ModelSpec, load_config

ROOT = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"chorus serving on \S+:(\d+)")
SAMPLE_S = 0.5  # how often resident memory is read during a phase
WARM_PROMPT = "1+1="


@dataclasses.dataclass
class Phase:
    latencies: list[float]
    codes: Counter
    floor: dict[str, float]  # MB by process: the lowest reading during the phase
    end: dict[str, float]  # MB by process at its end


def _rss_mb(pids: dict[str, int]) -> dict[str, float]:
    return {name: psutil.Process(pid).memory_info().rss / 2**20 for name, pid in pids.items()}


def prompt_of(rng: random.Random, tokens: int) -> str:
    """A short sum (`tokens` 0), or a prompt of about `tokens` tokens that no other request shares: random
    six-digit numbers, which the real pair's tokenizers write a digit per token."""
    if not tokens:
        return f"{rng.randrange(100)}+{rng.randrange(100)}="
    return "Add up: " + " ".join(str(rng.randrange(100_000, 1_000_000)) for _ in range(max(1, tokens // 7))) + " ="


async def _client(
    target: str, until: float, args: argparse.Namespace, seed: int, latencies: list[float], codes: Counter
) -> None:
    rng = random.Random(seed)
    async with chorus.AsyncClient(target, timeout=args.timeout) as client:
        while time.monotonic() < until:
            prompt = prompt_of(rng, args.prompt_tokens)
            started = time.perf_counter()
            try:
                await client.generate(prompt=prompt, max_new_tokens=args.max_new_tokens)
                codes["OK"] += 1
                latencies.append(time.perf_counter() - started)
            except chorus.ChorusError as exc:
                codes[exc.code.name] += 1
                if isinstance(exc, chorus.ResourceExhausted):
                    await asyncio.sleep(0.05)  # back off, as a client should


# --trace-memory: the coordinator runs under tracemalloc; each SIGUSR1 prints to its stderr the Python
# heap's size and the allocation sites that grew most since the previous signal. What RSS gains beyond
# the Python heap is native: gRPC's buffers, glibc's arenas.
TRACE_MEMORY = """
import signal, sys, tracemalloc
tracemalloc.start(8)
_last = [tracemalloc.take_snapshot()]
def _report(*_):
    snapshot = tracemalloc.take_snapshot()
    current, peak = tracemalloc.get_traced_memory()
    print(f"tracemalloc: python heap {current / 2**20:.1f} MB (peak {peak / 2**20:.1f} MB); grew most:",
          file=sys.stderr)
    for stat in snapshot.compare_to(_last[0], "traceback")[:8]:
        frames = stat.traceback.format(most_recent_first=True)
        where = " <- ".join(line.strip() for line in frames if line.lstrip().startswith("File"))
        print(f"  {stat.size_diff / 2**10:+.0f} KiB in {stat.count_diff:+d} blocks at {where}", file=sys.stderr)
    _last[0] = snapshot
signal.signal(signal.SIGUSR1, _report)
"""
MAIN = "import sys; from chorus.cli import main; sys.exit(main())"

# --baseline: one model in transformers alone (argv: model directory or GGUF file, dtype, prompt, new tokens);
# prints its resident memory in MiB. MKL keeps no work buffers, as in a worker (chorus_common.allocator).
TRANSFORMERS_ALONE = """
import ctypes, gc, os, sys
from pathlib import Path
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
import psutil, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
path, dtype, prompt, new_tokens = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name} if path.is_file() else {
    "pretrained_model_name_or_path": str(path)}
tokenizer = AutoTokenizer.from_pretrained(**where)
model = AutoModelForCausalLM.from_pretrained(**where, dtype=getattr(torch, dtype)).eval()
with torch.inference_mode():
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
gc.collect()
ctypes.CDLL(None).malloc_trim(0)
print(psutil.Process().memory_info().rss / 2**20)
"""


def _start_coordinator(
    config_path: str, addresses: dict[str, str], trace_memory: bool
) -> tuple[subprocess.Popen[str], int]:
    """`chorus coordinator` over the running workers, on a free port; returns the process and its port."""
    code = TRACE_MEMORY + MAIN if trace_memory else MAIN
    workers = [f"--worker={name}={address}" for name, address in addresses.items()]
    options = ["--log-level", "WARNING", "coordinator", "--config", config_path, "--port", "0", "--grace", "5"]
    command = [sys.executable, "-c", code, *options, *workers]
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


_SEEDS = itertools.count()  # every client of every phase its own: prompts of one phase do not come back


async def _load(target: str, args: argparse.Namespace, seconds: float) -> tuple[list[float], Counter]:
    latencies: list[float] = []
    codes: Counter = Counter()
    until = time.monotonic() + seconds
    await asyncio.gather(*(_client(target, until, args, next(_SEEDS), latencies, codes) for _ in range(args.clients)))
    return latencies, codes


async def _floor_mb(pids: dict[str, int], stop: asyncio.Event) -> dict[str, float]:
    """Each process's lowest resident memory, read every SAMPLE_S until stop is set. Under load RSS swings
    with the buffers of the requests in flight (a 262,144-entry distribution is 1 MB, a union of them
    more); the lowest reading of a phase is what stays: pools, caches, and any leak."""
    floor = _rss_mb(pids)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_S)
        floor = {name: min(mb, floor[name]) for name, mb in _rss_mb(pids).items()}
    return floor


async def _phase(target: str, args: argparse.Namespace, seconds: float, pids: dict[str, int]) -> Phase:
    stop = asyncio.Event()
    sampler = asyncio.create_task(_floor_mb(pids, stop))
    latencies, codes = await _load(target, args, seconds)
    stop.set()
    floor = await sampler
    if args.trace_memory:
        os.kill(pids["coordinator"], signal.SIGUSR1)
    return Phase(latencies, codes, floor, _rss_mb(pids))


async def _run(args: argparse.Namespace, target: str, pids: dict[str, int]) -> tuple[dict[str, object], Counter]:
    async with chorus.AsyncClient(target) as warm:
        for _ in range(20):
            await warm.generate(prompt=WARM_PROMPT, max_new_tokens=args.max_new_tokens)
    phases = [await _phase(target, args, args.warmup, pids)]  # the warm-up: fills caches and allocator pools
    phases += [await _phase(target, args, args.seconds / args.phases, pids) for _ in range(args.phases)]
    run = phases[1:]
    latencies = sorted(t for phase in run for t in phase.latencies)
    codes = sum((phase.codes for phase in run), Counter())

    def pct(p: float) -> float:
        return 1e3 * latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    report = {
        "clients": args.clients,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "phases": args.phases,
        "requests": sum(codes.values()),
        "by_status": dict(codes),
        "requests_per_s": round(codes["OK"] / args.seconds, 1),
        "p50_ms": round(pct(0.50), 1),
        "p99_ms": round(pct(0.99), 1),
        # Per process, for the warm-up and then each phase: the lowest reading during it, and the one at its end.
        "rss_mb_floor_by_phase": {name: [round(phase.floor[name], 1) for phase in phases] for name in pids},
        "rss_mb_end_by_phase": {name: [round(phase.end[name], 1) for phase in phases] for name in pids},
        "rss_growth_since_warmup_pct": {name: _growth_pct(phases[0].end[name], phases[-1].end[name]) for name in pids},
        # What the check reads: the floor's growth over the later half of the phases.
        "rss_floor_growth_later_half_pct": {
            name: later_half_growth_pct([phase.floor[name] for phase in phases]) for name in pids
        },
    }
    return report, phases[0].codes


def transformers_alone_mb(spec: ModelSpec, new_tokens: int) -> float:
    """The resident memory, in MiB, of `spec`'s model in transformers alone (--baseline), on a CPU."""
    from model_worker import catalog
    from model_worker.loading import resolve_dtype

    assert spec.path is not None
    dtype = str(resolve_dtype(spec.dtype, "cpu")).removeprefix("torch.")  # as the worker resolves it on a CPU
    model = catalog.resolve(spec.path)
    command = [sys.executable, "-c", TRANSFORMERS_ALONE, model, dtype, WARM_PROMPT, str(new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return float(done.stdout.split()[-1])


def with_baseline(report: dict[str, object], specs: list[ModelSpec], new_tokens: int) -> dict[str, object]:
    """The report with each model's memory in transformers alone, and its worker's highest floor over it."""
    floors: dict[str, list[float]] = report["rss_mb_floor_by_phase"]  # type: ignore[assignment]
    alone = {s.name: round(transformers_alone_mb(s, new_tokens), 1) for s in specs}
    return {
        **report,
        "rss_mb_transformers_alone": alone,
        "worker_floor_over_transformers_alone": {n: round(max(floors[n]) / mb, 3) for n, mb in alone.items()},
    }


def later_half_growth_pct(floors: list[float]) -> float:
    """Growth of a process's memory floors (the warm-up's, then each phase's) over the later half of the
    phases, in %: about 0 once pools have filled, whatever they took before; a leak's share of the run."""
    return _growth_pct(floors[_later_half(len(floors) - 1)], floors[-1])


def _later_half(phases: int) -> int:
    """The phase the later half of the run is compared from: phase ceil(phases / 2) (index 0 is the warm-up)."""
    return (phases + 1) // 2


def _growth_pct(before: float, after: float) -> float:
    return round(100 * (after - before) / before, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the first memory reading")
    parser.add_argument("--phases", type=int, default=4, help="equal phases --seconds is split into (at least 2)")
    parser.add_argument(
        "--max-growth", type=float, default=0.03, help="largest RSS growth over the later phases (0.03 = 3%%)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="0: short sums (a+b=); N: distinct prompts of about N tokens, so the workers' prefix caches fill",
    )
    parser.add_argument(
        "--kv-budget-mib", type=float, help="every worker's KV pool, over the config's kv_budget_mib (0 = auto)"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="every worker's dtype, over the config's (bfloat16 on a CPU runs fast only with bfloat16 instructions)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="after the run, each model's resident memory in transformers alone (a greedy generate), beside its worker",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="each request's deadline, seconds")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument(
        "--trace-memory", action="store_true", help="run the coordinator under tracemalloc: its heap's growth per phase"
    )
    args = parser.parse_args()
    if args.phases < 2:
        parser.error("--phases: at least 2 (the check compares the later half of the run)")
    if args.kv_budget_mib is not None and args.kv_budget_mib < 0:
        parser.error("--kv-budget-mib: at least 0 (0 = auto)")
    if args.prompt_tokens < 0:
        parser.error("--prompt-tokens: at least 0 (0 = short sums)")
    config = load_config(args.config)
    overrides = {k: v for k, v in (("kv_budget_mib", args.kv_budget_mib), ("dtype", args.dtype)) if v is not None}
    if overrides:
        models = [m.model_copy(update=overrides) for m in config.models]
        config = config.model_copy(update={"models": models})
    workers = cluster.spawn_workers(config)
    coordinator = None
    try:
        addresses = dict(zip(config.model_names, cluster.addresses(config, workers), strict=True))
        coordinator, port = _start_coordinator(str(Path(args.config).resolve()), addresses, args.trace_memory)
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
    if args.baseline:
        report = with_baseline(report, [m for m in config.models if m.address is None], args.max_new_tokens)
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
    later = report["rss_floor_growth_later_half_pct"]
    grown = {k: v for k, v in later.items() if v > 100 * args.max_growth}  # type: ignore[union-attr]
    if grown:
        after = _later_half(args.phases)
        print(
            f"resident memory (each phase's lowest) grew more than {100 * args.max_growth:g}% from phase {after} "
            f"to phase {args.phases} (a leak: pools that fill level off before): {grown}",
            file=sys.stderr,
        )
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
