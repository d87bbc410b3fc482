"""Benchmarks: performance figures as ratios measured side by side in one run, each against a target.

    python scripts/bench.py [--quick] [--json bench.json] [--only FIGURE,...]   (figures below, and `safe`)

The machine is shared and noisy, so no figure is an absolute time: each is a ratio of runs
interleaved in one process (A, B, ensemble, A, B, ensemble, ...; medians), or a per-step cost
measured in-process. Figures:

1. gac      GaC every step: ensemble ms/token / slowest member served alone (two random models of
            ~50M parameters, a Llama with a SentencePiece tokenizer and a GPT-2 with a byte-level
            BPE one, 32k vocabularies, one thread each), and the overhead per step in ms.
2. cpu      coordinator CPU per step (protobuf parse, wire decode, union mapping, mix, choose) for
            K = 2, 3 models and 32k / 150k / 200k vocabularies, top-k (k=20) and full fp16 transport.
3. streams  aggregate tokens/s of the GaC ensemble at 1, 8 and 32 concurrent streams, with the
            sessions per forward pass each worker achieved (its Prometheus histogram).
4. memory   worker RSS after 500 and after 5,000 short requests (concurrency 16, embedded models).
5. strategies  thresholded tokens/s against the fraction of steps ensembled; ME / GaC at saturation;
            SAFE / its drafter and SAFE / GaC (ms/token, forward passes per token) with an agreeing and
            a disagreeing verifier, and on the real pair (SmolLM2 drafting, Gemma 3 verifying, seven
            everyday prompts, greedy, 24 tokens: scripts/bench_safe.py); every other strategy's
            single-stream ms/token / GaC. `--only safe`: the SAFE figures alone.
6. engine   the worker engine: one decode step of 16 sessions at 64 / 512 / 1,536 tokens of context /
            transformers' forward with a StaticCache written in place (same SmolLM2-shaped model, same
            shapes, one thread); on the real SmolLM2 in process (one thread): 16 streams whose 64- and
            1,536-token prompts arrive together, median gap over their first 12 tokens and in steady
            state / a bare batch-16 forward; a chat's second turn after a 1,500-token history, cold /
            warm time to first token (prefix cache); 32 concurrent 200-token sessions at a KV budget of
            4 x 4,096 tokens, failures; the worker's host time per drawn token while 32 sessions of the
            real SmolLM2, then Gemma 3, draw 16 greedy tokens at once (information: the time a pass
            waits for its sessions, which a GPU's short passes expose); the worker's per-step CPU outside
            the forward (commit, re-tokenize the open tail, plan) at 2,000 / at 100 tokens of text
            (scripts/bench_engine.py).
7. few_rows  a decode pass of 2 / 3 / 4 / 8 sessions of a Gemma 3-shaped model (random weights, CPU, one
            thread) with the output layer computing a few rows as weight @ rows.T / with nn.Linear
            (model_worker/vocab_projection.py; target <= 1.0x).
8. long_streams  16 concurrent streams with 1,536-token prompts on the real SmolLM2 (one thread, a
            1 s step timeout): failures (target 0), time to first token and inter-token latency.
9. wire     a real Gemma 3 worker over gRPC (262,144 tokens, one thread): a step's time outside the
            forward with the full float32 distribution (1 MiB) / with the top 10 (information).

Prints a table (figure, value, target, PASS/MISS) and writes it with the details as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import re
import socket
import statistics
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_coordinator import coordinator_cpu_per_step, synthetic_vocabs  # noqa: E402

import chorus  # noqa: E402
from chorus_local import cluster  # noqa: E402
from coordinator.config import EnsembleConfig, ModelSpec, load_config, parse_config  # noqa: E402
from coordinator.strategies import STRATEGIES  # noqa: E402
from coordinator.union_vocab import UnionVocab  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Figure:
    """One row of the table: a value against a target (op '<=' or '>='; None = information only)."""

    key: str
    name: str
    value: float | None
    unit: str = ""
    op: str | None = None
    target: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "SKIP"
        if self.op is None or self.target is None:
            return "info"
        ok = self.value <= self.target if self.op == "<=" else self.value >= self.target
        return "PASS" if ok else "MISS"

    def row(self) -> tuple[str, str, str, str]:
        value = "-" if self.value is None else f"{_fmt(self.value)}{self.unit}"
        target = "-" if self.target is None else f"{self.op} {_fmt(self.target)}{self.unit}"
        return self.name, value, target, self.status


def _fmt(x: float) -> str:
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "target", "result"), *(f.row() for f in figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    notes = [f"- {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + (["", *notes] if notes else []))


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ---------------------------------------------------------------------------------------------
# Figure 2: coordinator CPU per step, in-process, no workers


def figure_cpu(quick: bool) -> list[Figure]:
    vocab_sizes = (32_000, 150_000, 200_000)
    steps = 60 if quick else 300
    figures = []
    for vocab in vocab_sizes:
        for k in (2, 3):
            vocabs = synthetic_vocabs(k, vocab)
            union = UnionVocab(vocabs)
            for transport, target in (("topk", 200.0), ("full", 2000.0)):
                r = coordinator_cpu_per_step(k, vocab, transport, steps=steps, union=union, vocabs=vocabs)
                label = "top-20" if transport == "topk" else "full fp16"
                figures.append(
                    Figure(
                        f"cpu_k{k}_v{vocab // 1000}k_{transport}",
                        f"coordinator CPU/step K={k} V={vocab // 1000}k {label}",
                        r["median_us"],
                        " us",
                        "<=",
                        target,
                        r,
                    )
                )
    return figures


# ---------------------------------------------------------------------------------------------
# Models for the figures with workers: random, ~50M parameters, 32k trained tokenizers

BENCH_PROMPTS = (
    "def fibonacci(n):\n    ",
    "class Queue:\n    def __init__(self):\n",
    "import os\nimport sys\n\n",
    "for i in range(10):\n    print(",
    "# Parse the arguments\nparser = ",
    "with open(path) as fh:\n    ",
    "try:\n    value = int(text)\nexcept ",
    "return sorted(items, key=",
)


def _corpus(limit: int = 6_000_000) -> tuple[str, ...]:
    """ASCII Python sources of the standard library: a local corpus for the tokenizers."""
    texts: list[str] = []
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        if text.isascii():
            texts.append(text)
            total += len(text)
        if total > limit:
            break
    return tuple(texts)


@contextlib.contextmanager
def _factory_corpus(texts: tuple[str, ...]) -> Iterator[Any]:
    """tests.tokenizer_factory's builders, training on `texts` instead of their tiny corpus."""
    from tests import tokenizer_factory

    saved = tokenizer_factory.CORPUS
    tokenizer_factory.CORPUS = texts
    try:
        yield tokenizer_factory
    finally:
        tokenizer_factory.CORPUS = saved


def build_models(root: Path, vocab: int = 32_000, logit_scale: float = 12.0) -> dict[str, Path]:
    """Two random models that never pick end-of-sequence (its output row is zero), with sharper than
    random-init distributions (output rows scaled by logit_scale) so thresholds gate some steps."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    with _factory_corpus(_corpus()) as factory:
        sp = factory.sentencepiece_byte_fallback(merges=vocab - 400)
        bpe = factory.byte_level_bpe(merges=vocab - 259)
    paths = {"llama-sp": root / "llama-sp", "gpt2-bpe": root / "gpt2-bpe"}
    torch.manual_seed(0)
    sp.save_pretrained(paths["llama-sp"])
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(sp),
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=1024,
            bos_token_id=sp.bos_token_id,
            eos_token_id=sp.eos_token_id,
            tie_word_embeddings=False,
        )
    )
    bpe.save_pretrained(paths["gpt2-bpe"])
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(bpe),
            n_embd=576,
            n_layer=8,
            n_head=8,
            n_positions=1024,
            bos_token_id=bpe.bos_token_id,
            eos_token_id=bpe.eos_token_id,
            tie_word_embeddings=False,
        )
    )
    for model, tokenizer, name in ((llama, sp, "llama-sp"), (gpt2, bpe, "gpt2-bpe")):
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            head.mul_(logit_scale)
            head[tokenizer.eos_token_id] = 0.0  # logit 0: practically never the largest
        model.save_pretrained(paths[name])
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    name: str
    process: cluster.WorkerProcess
    metrics_port: int

    @property
    def address(self) -> str:
        return self.process.address

    def batch_histogram(self) -> tuple[float, float]:
        """(sum, count) of the worker's sessions-per-forward-pass histogram."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        found = {}
        for stat in ("sum", "count"):
            match = re.search(rf"^chorus_worker_batch_size_{stat}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
            found[stat] = float(match.group(1)) if match else 0.0
        return found["sum"], found["count"]


@contextlib.contextmanager
def worker_output_to(log: Path) -> Iterator[None]:
    """Processes started in the block write their stdout and stderr to log instead of the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def spawn(path: Path, name: str, options: dict[str, Any] | None = None) -> Worker:
    """A worker of one thread (options: WorkerArgs fields over the defaults)."""
    port = _free_port()
    spec = ModelSpec(name=name, path=str(path))
    with worker_output_to(path.parent / "workers.log"):
        process = cluster.spawn_worker(spec, timeout=600, threads=1, metrics_port=port, options=options)
    return Worker(name, process, port)


def bench_config(workers: list[Worker], strategy: str = "gac", primary: str | None = None) -> EnsembleConfig:
    models = [
        {
            "name": w.name,
            "path": str(w.process.spec.path),
            "address": w.address,
            "priority": "primary" if w.name == primary else "supportive",
        }
        for w in workers
    ]
    return parse_config(
        {
            "models": models,
            "strategy": strategy,
            "server": {"port": 0},
            "transport": {"top_k": 0, "dtype": "float16"},
            # A loaded shared machine must not turn a slow step into a lost worker.
            "limits": {"step_timeout_s": 60.0, "first_step_timeout_s": 120.0, "max_conversations": 64},
        },
        ROOT,
    )


@contextlib.asynccontextmanager
async def serving(config: EnsembleConfig) -> Any:
    """An in-process coordinator for config; yields an AsyncClient on it."""
    running = await cluster.start_coordinator(config, [m.address for m in config.models], port=0)  # type: ignore[misc]
    try:
        async with chorus.AsyncClient(f"127.0.0.1:{running.port}", timeout=600) as client:
            yield client
    finally:
        await running.stop(grace=0)


async def timed(client: chorus.AsyncClient, prompt: str, tokens: int, **kwargs: Any) -> dict[str, float]:
    started = time.perf_counter()
    result = await client.generate(prompt=prompt, max_new_tokens=tokens, **kwargs)
    wall = time.perf_counter() - started
    steps = max(1, result.usage.steps)
    return {
        "wall_s": wall,
        "steps": result.usage.steps,
        "tokens": result.usage.completion_tokens,
        "ms_per_step": wall * 1e3 / steps,
        "ensembled": result.usage.steps_ensembled / steps,
        "fed_per_step": {m.name: m.tokens_fed / steps for m in result.usage.models},
        "passes_per_step": {m.name: m.forward_passes / steps for m in result.usage.models},
    }


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) a process has used so far; None = this one (coordinator and client)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


# ---------------------------------------------------------------------------------------------
# Figure 1: GaC every step against the slowest member alone


async def figure_gac(workers: list[Worker], rounds: int, tokens: int) -> list[Figure]:
    a, b = workers
    async with (
        serving(bench_config([a])) as alone_a,
        serving(bench_config([b])) as alone_b,
        serving(bench_config([a, b])) as ens,
    ):
        runs: dict[str, list[float]] = {a.name: [], b.name: [], "gac": []}
        ratios: list[float] = []
        overheads: list[float] = []
        prompt = BENCH_PROMPTS[0]
        cpu: dict[str, dict[str, list[float]]] = {n: {"coordinator": [], a.name: [], b.name: []} for n in runs}
        pids = {"coordinator": None, a.name: a.process.process.pid, b.name: b.process.process.pid}
        for r in range(rounds + 1):  # round 0 warms up
            got = {}
            for name, client, extra in (
                (a.name, alone_a, {}),
                (b.name, alone_b, {}),
                ("gac", ens, {"strategy": "gac"}),
            ):
                before = {k: _cpu_s(pid) for k, pid in pids.items()}
                got[name] = await timed(client, prompt, tokens, **extra)
                if r:
                    for k, pid in pids.items():
                        cpu[name][k].append((_cpu_s(pid) - before[k]) * 1e3 / max(1, got[name]["steps"]))
            if got["gac"]["steps"] < tokens:
                raise RuntimeError(f"the ensemble stopped after {got['gac']['steps']} of {tokens} steps")
            if r == 0:
                continue
            for name, g in got.items():
                runs[name].append(g["ms_per_step"])
            slowest = max(got[a.name]["ms_per_step"], got[b.name]["ms_per_step"])
            ratios.append(got["gac"]["ms_per_step"] / slowest)
            overheads.append(got["gac"]["ms_per_step"] - slowest)
    medians = {name: round(_median(v), 2) for name, v in runs.items()}
    cpu_ms = {name: {k: round(_median(v), 2) for k, v in per.items()} for name, per in cpu.items()}
    details = {
        "rounds": rounds,
        "tokens_per_request": tokens,
        "median_ms_per_step": medians,
        "ratios": ratios,
        "cpu_ms_per_step": cpu_ms,
        "tokens_fed_per_step": {n: g["fed_per_step"] for n, g in got.items()},
        "forward_passes_per_step": {n: g["passes_per_step"] for n, g in got.items()},
        "load_average": os.getloadavg(),
    }
    fed = got["gac"]["fed_per_step"]
    note = (
        f"ms/token medians: {a.name} alone {medians[a.name]}, {b.name} alone {medians[b.name]}, "
        f"GaC {medians['gac']} ({rounds} interleaved rounds of {tokens} tokens). CPU ms per step, GaC vs alone: "
        f"coordinator+client {cpu_ms['gac']['coordinator']} vs {cpu_ms[a.name]['coordinator']}/"
        f"{cpu_ms[b.name]['coordinator']}, {a.name} {cpu_ms['gac'][a.name]} vs {cpu_ms[a.name][a.name]}, "
        f"{b.name} {cpu_ms['gac'][b.name]} vs {cpu_ms[b.name][b.name]}; tokens fed per step in GaC: "
        + ", ".join(f"{k} {v:.2f}" for k, v in fed.items())
        + f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    return [
        Figure("gac_ratio", "GaC ms/token / slowest alone", _median(ratios), "x", "<=", 1.05, details, note),
        Figure("gac_overhead_ms", "GaC overhead per step", _median(overheads), " ms", details={"overheads": overheads}),
    ]


# ---------------------------------------------------------------------------------------------
# Figure 3: aggregate tokens/s at 1, 8, 32 concurrent streams


async def _streams(client: chorus.AsyncClient, n: int, tokens: int, **kwargs: Any) -> dict[str, float]:
    prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] + f"x{i} = " for i in range(n)]
    started = time.perf_counter()
    results = await asyncio.gather(*(client.generate(prompt=p, max_new_tokens=tokens, **kwargs) for p in prompts))
    wall = time.perf_counter() - started
    produced = sum(r.usage.completion_tokens for r in results)
    return {"tokens": produced, "wall_s": wall, "tokens_per_s": produced / wall}


async def figure_streams(workers: list[Worker], rounds: int, tokens: int) -> list[Figure]:
    """Aggregate tokens/s at 1, 8, 32 streams: one model served alone, then the GaC ensemble."""
    return [*await _figure_streams(workers[:1], rounds, tokens), *await _figure_streams(workers, rounds, tokens)]


async def _figure_streams(workers: list[Worker], rounds: int, tokens: int) -> list[Figure]:
    levels = (1, 8, 32)
    what = "GaC" if len(workers) > 1 else workers[0].name
    rates: dict[int, list[float]] = {n: [] for n in levels}
    batch: dict[int, dict[str, list[float]]] = {n: {w.name: [0.0, 0.0] for w in workers} for n in levels}
    async with serving(bench_config(workers)) as client:
        await _streams(client, 2, 4)  # warm-up
        for _ in range(rounds):
            for n in levels:
                before = {w.name: w.batch_histogram() for w in workers}
                rates[n].append((await _streams(client, n, tokens))["tokens_per_s"])
                for w in workers:
                    after = w.batch_histogram()
                    batch[n][w.name][0] += after[0] - before[w.name][0]
                    batch[n][w.name][1] += after[1] - before[w.name][1]
    medians = {n: _median(rates[n]) for n in levels}
    mean_batch = {n: {name: round(s / c, 1) if c else None for name, (s, c) in batch[n].items()} for n in levels}
    details = {"tokens_per_stream": tokens, "rounds": rounds, "tokens_per_s": rates, "mean_batch": mean_batch}
    key = "gac" if len(workers) > 1 else "alone"
    figures = [
        Figure(
            f"streams_{key}_{n}_tps",
            f"{what} aggregate tokens/s, {n} stream{'s' if n > 1 else ''}",
            medians[n],
            " tok/s",
            details={"mean_sessions_per_pass": mean_batch[n]},
        )
        for n in levels
    ]
    figures.append(
        Figure(
            f"streams_{key}_32_over_1",
            f"{what}: 32 streams / 1 stream tokens/s",
            medians[32] / medians[1],
            "x",
            ">=",
            8.0,
            details,
            "mean sessions per forward pass at 8 / 32 streams: "
            + ", ".join(f"{k} {mean_batch[8][k]} / {mean_batch[32][k]}" for k in mean_batch[32]),
        )
    )
    return figures


# ---------------------------------------------------------------------------------------------
# Figure 4: worker memory over many short requests


async def figure_memory(first: int, total: int, concurrency: int = 16) -> list[Figure]:
    config = load_config(ROOT / "configs" / "default.yaml")
    with worker_output_to(Path(tempfile.gettempdir()) / "chorus-bench-workers.log"):
        procs = cluster.spawn_workers(config)
    try:
        addresses = cluster.addresses(config, procs)
        running = await cluster.start_coordinator(config, addresses, port=0)
        rss: dict[str, dict[str, float]] = {}
        try:
            async with chorus.AsyncClient(f"127.0.0.1:{running.port}", timeout=120) as client:
                done = 0

                async def drive(count: int) -> None:
                    nonlocal done
                    queue = iter(range(count))

                    async def one_client(seed: int) -> None:
                        nonlocal done
                        rng = np.random.default_rng(seed)
                        for _ in queue:
                            a, b = (int(x) for x in rng.integers(0, 100, 2))
                            await client.generate(prompt=f"{a}+{b}=", max_new_tokens=8)
                            done += 1

                    await asyncio.gather(*(one_client(done + i) for i in range(concurrency)))

                def measure() -> dict[str, float]:
                    return {w.spec.name: psutil.Process(w.process.pid).memory_info().rss / 2**20 for w in procs}

                await drive(first)
                rss[f"after_{done}"] = measure()
                await drive(total - first)
                rss[f"after_{done}"] = measure()
        finally:
            await running.stop(grace=0)
    finally:
        for w in procs:
            w.stop()
    early, late = rss[f"after_{first}"], rss[f"after_{total}"]
    growth = {name: late[name] / early[name] - 1 for name in early}
    worst = max(growth, key=lambda n: growth[n])
    details = {"rss_mb": {k: {n: round(v, 1) for n, v in d.items()} for k, d in rss.items()}, "growth": growth}
    note = "; ".join(f"{n} {early[n]:.0f} -> {late[n]:.0f} MB" for n in early)
    return [
        Figure(
            "memory_growth",
            f"worker RSS growth {first} -> {total} requests (worst: {worst})",
            100 * growth[worst],
            " %",
            "<=",
            5.0,
            details,
            note,
        )
    ]


# ---------------------------------------------------------------------------------------------
# Figure 5: strategies


async def figure_threshold(workers: list[Worker], rounds: int, tokens: int) -> list[Figure]:
    """Thresholded tokens/s (single stream, primary = the first worker) against the fraction of steps ensembled."""
    thresholds = (0.0, 0.5, 0.9, 1.0)
    prompt = BENCH_PROMPTS[1]
    tps: dict[str, list[float]] = {"gac": [], **{str(t): [] for t in thresholds}}
    frac: dict[str, list[float]] = {str(t): [] for t in thresholds}
    async with serving(bench_config(workers, primary=workers[0].name)) as client:
        await timed(client, prompt, 4)
        for _ in range(rounds):
            g = await timed(client, prompt, tokens, strategy="gac")
            tps["gac"].append(1e3 / g["ms_per_step"])
            for t in thresholds:
                r = await timed(client, prompt, tokens, strategy="threshold", threshold=t)
                tps[str(t)].append(1e3 / r["ms_per_step"])
                frac[str(t)].append(r["ensembled"])
    gac = _median(tps["gac"])
    figures = [Figure("threshold_gac_tps", "GaC every step, single stream", gac, " tok/s")]
    for t in thresholds:
        value = _median(tps[str(t)])
        f = _median(frac[str(t)])
        figures.append(
            Figure(
                f"threshold_{t}_tps",
                f"threshold {t}: tokens/s (ensembled {100 * f:.0f}% of steps)",
                value,
                " tok/s",
                details={"fraction_ensembled": f, "speedup_over_gac": value / gac},
            )
        )
    return figures


async def figure_me(
    workers: list[Worker], third: Callable[[], Awaitable[Worker]], rounds: int, tokens: int
) -> list[Figure]:
    """ME / GaC aggregate tokens/s at saturation (32 streams),
    with 2 models (>= 1.9) and 3 models (>= 2.8), and the single-stream latency ratio.
    ME refuses greedy: both strategies sample (temperature 1, seeded) so they do the same work per token."""
    sampling = {"temperature": 1.0, "seed": 1234}
    figures = []
    for members, target in ((workers, 1.9), ([*workers, await third()], 2.8)):
        k = len(members)
        sat: dict[str, list[float]] = {"me": [], "gac": []}
        single: dict[str, list[float]] = {"me": [], "gac": []}
        async with serving(bench_config(members)) as client:
            await _streams(client, 2, 4, **sampling)
            for _ in range(rounds):
                for strategy in ("me", "gac"):
                    streams = await _streams(client, 32, tokens, strategy=strategy, **sampling)
                    sat[strategy].append(streams["tokens_per_s"])
                    single[strategy].append(
                        (await timed(client, BENCH_PROMPTS[2], tokens, strategy=strategy, **sampling))["ms_per_step"]
                    )
        figures.append(
            Figure(
                f"me_k{k}_saturation",
                f"ME / GaC tokens/s at 32 streams, K={k}",
                _median(sat["me"]) / _median(sat["gac"]),
                "x",
                ">=",
                target,
                {"tokens_per_s": sat},
            )
        )
        figures.append(
            Figure(
                f"me_k{k}_latency",
                f"ME / GaC single-stream ms/token, K={k}",
                _median(single["me"]) / _median(single["gac"]),
                "x",
                details={"ms_per_step": single},
            )
        )
    return figures


async def figure_safe(
    workers: list[Worker], third: Callable[[], Awaitable[Worker]], rounds: int, tokens: int
) -> list[Figure]:
    """SAFE ms/token / the drafter served alone, target <= 1.15, and SAFE / GaC ms/token and forward
    passes per token on the same pair, target <= 1, with the fraction of steps ensembled, for two
    verifiers: a copy of the drafter (members that agree, SAFE's regime: what the generate-verify
    cycle itself costs) and the other random model (members that disagree on nearly every token:
    the worst case, where SAFE ensembles almost every position). Runs interleaved: alone, SAFE, GaC."""
    drafter = workers[0]
    figures = []
    for label, verifier in (("agreeing", await third()), ("disagreeing", workers[1])):
        alone_ratios: list[float] = []
        gac_ratios: list[float] = []
        pass_ratios: list[float] = []
        frac: list[float] = []
        prompt = BENCH_PROMPTS[3]
        async with (
            serving(bench_config([drafter])) as alone,
            serving(bench_config([drafter, verifier], primary=drafter.name)) as ens,
        ):
            for r in range(rounds + 1):
                base = await timed(alone, prompt, tokens)
                safe = await timed(ens, prompt, tokens, strategy="safe")
                gac = await timed(ens, prompt, tokens, strategy="gac")
                if r:
                    alone_ratios.append(safe["ms_per_step"] / base["ms_per_step"])
                    gac_ratios.append(safe["ms_per_step"] / gac["ms_per_step"])
                    pass_ratios.append(sum(safe["passes_per_step"].values()) / sum(gac["passes_per_step"].values()))
                    frac.append(safe["ensembled"])
        ensembled = f"ensembled {100 * _median(frac):.0f}%"
        figures += [
            Figure(
                f"safe_ratio_{label}",
                f"SAFE ms/token / drafter alone, {label} verifier ({ensembled})",
                _median(alone_ratios),
                "x",
                "<=",
                1.15 if label == "agreeing" else None,
                {"ratios": alone_ratios, "fraction_ensembled": frac},
            ),
            Figure(
                f"safe_gac_{label}",
                f"  SAFE / GaC ms/token, {label} verifier",
                _median(gac_ratios),
                "x",
                "<=",
                1.0,
                {"ratios": gac_ratios},
            ),
            Figure(
                f"safe_gac_passes_{label}",
                f"  SAFE / GaC forward passes per token, {label} verifier",
                _median(pass_ratios),
                "x",
                "<=",
                1.0,
                {"ratios": pass_ratios},
            ),
        ]
    return figures


async def figure_safe_real(rounds: int, tokens: int) -> list[Figure]:
    """SAFE / GaC on the real pair (SmolLM2 drafting, Gemma 3 verifying), seven everyday prompts,
    greedy: the worst prompt's ms/token and forward passes per token ratios (scripts/bench_safe.py), and
    GaC run again against itself, interleaved alike: the spread the ms/token ratios are read against."""
    import bench_safe

    with tempfile.TemporaryDirectory(prefix="chorus-bench-") as tmp:
        result = await bench_safe.compare(rounds, tokens, Path(tmp), gac_twice=True)
    prompts = result["prompts"]
    worst = max(prompts, key=lambda p: p["ms_ratio"])
    worst_passes = max(prompts, key=lambda p: p["passes_ratio"])
    details = {"per_prompt": prompts}
    return [
        Figure(
            "safe_gac_real",
            f"SAFE / GaC ms/token, real pair, worst of {len(prompts)} prompts",
            worst["ms_ratio"],
            "x",
            "<=",
            1.0,
            details,
            note=f"worst: {worst['prompt']!r}; " + ", ".join(f"{p['ms_ratio']:.2f}" for p in prompts),
        ),
        Figure(
            "safe_gac_passes_real",
            "  SAFE / GaC forward passes per token, real pair, worst prompt",
            worst_passes["passes_ratio"],
            "x",
            "<=",
            1.0,
            note=", ".join(f"{p['safe_passes_per_token']:.2f}/{p['gac_passes_per_token']:.2f}" for p in prompts),
        ),
        Figure(
            "safe_gac_again_real",
            "  GaC again / GaC ms/token, the same prompts (the noise floor), worst prompt",
            max(p["gac_again_ms_ratio"] for p in prompts),
            "x",
            note=", ".join(f"{p['gac_again_ms_ratio']:.2f}" for p in prompts),
        ),
    ]


async def figure_other_strategies(workers: list[Worker], rounds: int, tokens: int) -> list[Figure]:
    """Single-stream ms/token / GaC for every strategy without a figure of its own (sampled, seeded)."""
    known = {"gac", "threshold", "me", "safe"}
    others = [s for s in STRATEGIES if s not in known]
    if not others:
        return []
    sampling = {"temperature": 1.0, "seed": 99}
    ms: dict[str, list[float]] = {s: [] for s in ["gac", *others]}
    errors: dict[str, str] = {}
    async with serving(bench_config(workers, primary=workers[0].name)) as client:
        for _ in range(rounds):
            for s in ms:
                if s in errors:
                    continue
                try:
                    ms[s].append((await timed(client, BENCH_PROMPTS[4], tokens, strategy=s, **sampling))["ms_per_step"])
                except chorus.ChorusError as exc:
                    errors[s] = str(exc)
    gac = _median(ms["gac"])
    return [
        Figure(
            f"strategy_{s}_latency",
            f"{s} / GaC single-stream ms/token",
            None if s in errors else _median(ms[s]) / gac,
            "x",
            note=errors.get(s, ""),
        )
        for s in others
    ]


# ---------------------------------------------------------------------------------------------
# The worker engine (issue: KV caches in place, chunked prefill, liveness, per-step CPU)


def figure_engine(quick: bool) -> list[Figure]:
    """Decode step at 16 sessions vs an in-place StaticCache forward; per-step CPU outside the forward."""
    import bench_engine
    import torch
    from transformers import AutoTokenizer

    from model_worker import catalog
    from model_worker.loading import load_model
    from model_worker.runtime import Runtime

    torch.set_num_threads(1)
    model = bench_engine.random_model(bench_engine.SMOLLM2)
    contexts = (64, 512, 1536)
    rows = bench_engine.decode_step_ratio(model, contexts, sessions=16, rounds=3 if quick else 10)
    figures = [
        Figure(
            f"engine_decode_{r['context']}",
            f"decode step, 16 sessions at {r['context']} tokens / StaticCache",
            r["ratio"],
            "x",
            "<=",
            1.15,
            r,
        )
        for r in rows
    ]
    del model
    figures += _real_engine_figures(quick)
    smol, gemma = (
        AutoTokenizer.from_pretrained(catalog.prepare(n, log=False)) for n in ("smollm2-135m-instruct", "gemma3-270m")
    )
    for name in ("smollm2-135m-instruct", "gemma3-270m"):
        loaded = load_model(str(catalog.prepare(name, log=False)), max_model_len=1024)
        r = bench_engine.draft_host_time(Runtime(loaded), sessions=8 if quick else 32, tokens=4 if quick else 16)
        del loaded
        figures.append(
            Figure(
                f"engine_draft_host_{name.split('-')[0]}",
                f"{name}: host time per drawn token, {r['sessions']} sessions drawing greedily at once",
                r["host_us_per_token"],
                " us",
                details=r,
                note=f"{100 * r['host_share']:.0f}% of the wall time; {r['passes']} passes for {r['tokens']} tokens; "
                f"{r['drawn']} drawn",
            )
        )
    cpu = bench_engine.conditioning_cpu(smol, gemma, steps=50 if quick else 300)
    for kind, label in (("own", "its own tokens"), ("foreign", "another tokenizer's pieces")):
        short, long = cpu[kind][100], cpu[kind][2000]
        figures.append(
            Figure(
                f"engine_step_cpu_{kind}",
                f"per-step CPU outside the forward, {label}: 2,000 / 100 tokens of text",
                long / short,
                "x",
                "<=",
                1.2,
                {"us_at_100": short, "us_at_2000": long},
                note=f"{short:.0f} us at 100 tokens, {long:.0f} us at 2,000",
            )
        )
    return figures


def figure_few_rows(quick: bool) -> list[Figure]:
    """A decode pass of a few sessions of a Gemma 3-shaped model (the widest output layer of the real pair):
    the output layer computing a few rows as weight @ rows.T / nn.Linear (CPU, one thread)."""
    import bench_engine
    import torch

    torch.set_num_threads(1)
    model = bench_engine.random_model(bench_engine.GEMMA3)
    return [
        Figure(
            f"few_rows_{r['sessions']}",
            f"decode pass of {r['sessions']} sessions, Gemma 3 shape: output layer as weight @ rows.T / nn.Linear",
            r["ratio"],
            "x",
            "<=",
            1.0,
            r,
            note=f"{r['few_rows_ms']:.0f} vs {r['plain_ms']:.0f} ms",
        )
        for r in bench_engine.few_rows_ratio(model, rounds=3 if quick else 10)
    ]


def _real_engine_figures(quick: bool) -> list[Figure]:
    """The engine on the real SmolLM2 in process (one thread): bursts, prefix reuse, capacity by blocks."""
    import bench_engine

    from chorus_common.worker_args import WorkerArgs
    from model_worker import catalog
    from model_worker.loading import load_model
    from model_worker.runtime import Runtime

    loaded = load_model(str(catalog.prepare("smollm2-135m-instruct", log=False)), max_model_len=4096)
    figures = []
    streams = 8 if quick else 16
    lengths = (64, 512) if quick else (64, 1536)
    plain: dict[int, dict] = {}
    stretch = WorkerArgs.decode_stretch
    for length in lengths:
        r = plain[length] = bench_engine.burst(Runtime(loaded), length, streams=streams)
        note = (
            f"{r['burst_gap_ms']:.0f} / {r['steady_gap_ms']:.0f} ms vs {r['bare_forward_ms']:.0f} ms; first token "
            f"p50 {r['ttft_p50_s']:.1f} s, last token {r['last_token_max_s']:.1f} s"
        )
        figures += [
            Figure(
                f"engine_burst_{length}",
                f"{streams} streams, {length}-token prompts arriving together: "
                "median gap, first 12 tokens / bare forward",
                r["burst_ratio"],
                "x",
                "<=",
                1.3,
                r,
                note=note,
            ),
            Figure(
                f"engine_steady_{length}",
                "  the same, steady state (tokens 13-24) / bare forward",
                r["steady_ratio"],
                "x",
                "<=",
                1.15,
                r,
            ),
        ]
    # The longer burst again with --decode-stretch 0: prompt chunks fill every pass (the most throughput).
    longest = lengths[-1]
    r = bench_engine.burst(Runtime(loaded, decode_stretch=0.0), longest, streams=streams)
    held = plain[longest]
    figures.append(
        Figure(
            f"engine_burst_{longest}_unstretched",
            "  the same with --decode-stretch 0 (off): median gap, first 12 tokens / bare forward",
            r["burst_ratio"],
            "x",
            None,
            None,
            r,
            note=f"{r['burst_gap_ms']:.0f} / {r['steady_gap_ms']:.0f} ms vs {r['bare_forward_ms']:.0f} ms; first "
            f"token p50 {r['ttft_p50_s']:.1f} s (max {r['ttft_max_s']:.1f} s) against {held['ttft_p50_s']:.1f} s "
            f"({held['ttft_max_s']:.1f} s) with the default {stretch:g}; last token {r['last_token_max_s']:.1f} s "
            f"against {held['last_token_max_s']:.1f} s",
        )
    )
    # What the default stretch costs when streams write longer than the burst's 24 tokens: prompts get a small
    # share of each pass while any stream writes, the streams start one by one, their decodes share fewer passes.
    length, tokens = (256, 48) if quick else (512, 64)
    held, unstretched = (
        bench_engine.burst(Runtime(loaded, decode_stretch=s), length, streams, tokens) for s in (stretch, 0.0)
    )
    figures.append(
        Figure(
            "engine_stretch_long_writes",
            f"  --decode-stretch {stretch:g} (the default) on {streams} streams of {length}-token prompts writing "
            f"{tokens} tokens: last token / with 0 (off)",
            held["last_token_max_s"] / unstretched["last_token_max_s"],
            "x",
            None,
            None,
            {"without": unstretched, "with": held},
            note=f"last token {held['last_token_max_s']:.1f} vs {unstretched['last_token_max_s']:.1f} s; first "
            f"token p50 {held['ttft_p50_s']:.1f} vs {unstretched['ttft_p50_s']:.1f} s; median gap, first 12 "
            f"tokens {held['burst_gap_ms']:.0f} vs {unstretched['burst_gap_ms']:.0f} ms",
        )
    )
    r = bench_engine.reuse(Runtime(loaded), history_tokens=500 if quick else 1500)
    figures.append(
        Figure(
            "engine_reuse",
            f"second turn after a {r['history_tokens']}-token history: cold / warm time to first token (prefix cache)",
            r["speedup"],
            "x",
            ">=",
            5.0,
            r,
            note=f"{r['cold_ttft_ms']:.0f} vs {r['warm_ttft_ms']:.0f} ms",
        )
    )
    budget = 4 * 4096 * Runtime(loaded).kv_bytes_per_token  # 4 full 4,096-token sessions
    r = bench_engine.capacity(Runtime(loaded, kv_budget_bytes=budget), sessions=16 if quick else 32)
    figures.append(
        Figure(
            "engine_capacity",
            f"{r['sessions']} concurrent 200-token sessions at a KV budget of 4 x 4,096 tokens: failed",
            float(r["failed"]),
            "",
            "<=",
            0.0,
            r,
            note="; ".join(r["errors"])[:120],
        )
    )
    return figures


async def figure_long_streams(quick: bool) -> list[Figure]:
    """16 concurrent streams with 1,536-token prompts on the real SmolLM2 (one thread): none may fail;
    time to first token and inter-token latency."""
    from model_worker import catalog
    from scripts.real_tasks import load_items

    path = catalog.prepare("smollm2-135m-instruct", log=False)
    streams, new = (8, 8) if quick else (16, 16)
    text = " ".join(i.prompt + " " + i.answer for i in load_items(200))
    with tempfile.TemporaryDirectory(prefix="chorus-bench-") as tmp:
        port = _free_port()
        spec = ModelSpec(name="smollm2", path=str(path), max_model_len=2048)
        with worker_output_to(Path(tmp) / "workers.log"):
            process = cluster.spawn_worker(spec, timeout=600, threads=1, metrics_port=port)
        worker = Worker("smollm2", process, port)
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
            ids = tok(text)["input_ids"]
            # 1,536 tokens each, each a different window of the text
            prompts = [tok.decode(ids[i * 97 : i * 97 + 1536]) for i in range(streams)]
            config = bench_config([worker])
            config = config.model_copy(
                update={"limits": config.limits.model_copy(update={"step_timeout_s": 1.0, "first_step_timeout_s": 5.0})}
            )
            async with serving(config) as client:

                async def one(prompt: str) -> dict[str, Any]:
                    started = time.perf_counter()
                    arrivals: list[float] = []
                    try:
                        async for _ in client.stream(prompt=prompt, max_new_tokens=new):
                            arrivals.append(time.perf_counter())
                    except chorus.ChorusError as exc:
                        return {"error": f"{type(exc).__name__}: {exc}"}
                    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
                    return {"ttft": arrivals[0] - started if arrivals else None, "gaps": gaps}

                results = await asyncio.gather(*(one(p) for p in prompts))
        finally:
            process.stop()
    failures = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in results if r.get("ttft") is not None]
    gaps = [g for r in results for g in r.get("gaps", [])]

    def q(xs: list[float], p: float) -> float:
        return float(np.percentile(xs, p)) * 1e3 if xs else float("nan")

    details = {"streams": streams, "prompt_tokens": 1536, "failures": failures}
    return [
        Figure(
            "long_streams_failures",
            f"{streams} streams with 1,536-token prompts: failed",
            float(len(failures)),
            "",
            "<=",
            0.0,
            details,
            note=failures[0] if failures else "",
        ),
        Figure(
            "long_streams_ttft", "  time to first token p50 / p99", q(ttft, 50), " ms", note=f"p99 {q(ttft, 99):.0f} ms"
        ),
        Figure(
            "long_streams_itl", "  inter-token latency p50 / p99", q(gaps, 50), " ms", note=f"p99 {q(gaps, 99):.0f} ms"
        ),
    ]


# ---------------------------------------------------------------------------------------------


async def figure_wire(quick: bool) -> list[Figure]:
    """What a full distribution costs a step beyond the forward: a Gemma 3 worker (262,144 tokens, one thread)
    over gRPC, one session writing, each step's round trip less the worker's compute_ms, with full float32
    distributions (1 MiB) and with the top 10, in interleaved rounds."""
    from chorus_common.types import Prompt
    from coordinator.workers import Transport, WorkerClient
    from model_worker import catalog

    path = catalog.prepare("gemma3-270m", log=False)
    rounds, steps = (2, 10) if quick else (4, 20)
    with tempfile.TemporaryDirectory(prefix="chorus-bench-") as tmp:
        with worker_output_to(Path(tmp) / "workers.log"):
            process = cluster.spawn_worker(ModelSpec(name="gemma3", path=str(path)), timeout=600, threads=1)
        client = WorkerClient(process.address)
        outside: dict[str, list[float]] = {"full": [], "top10": []}
        try:
            for _ in range(rounds):
                for name, transport in (("full", Transport(0, False)), ("top10", Transport(10, False))):
                    session = client.session(None)
                    await session.open(Prompt(text="The capital of France is"), "bench-wire")
                    await session.step(b"", transport)
                    for _ in range(steps):
                        started = time.perf_counter()
                        result = await session.step(b" the", transport)
                        outside[name].append((time.perf_counter() - started) * 1e3 - result.compute_ms)
                    session.cancel()
        finally:
            await client.close()
            process.stop()
    full, top = _median(outside["full"]), _median(outside["top10"])
    return [
        Figure(
            "wire_full_step",
            "Gemma 3 worker over gRPC: a step's time outside the forward, full float32 distribution / top 10",
            full / top,
            "x",
            details={"full_ms": full, "top10_ms": top, "steps": len(outside["full"])},
            note=f"{full:.1f} vs {top:.1f} ms",
        )
    ]


FIGURES = ("gac", "cpu", "streams", "memory", "strategies", "safe", "engine", "few_rows", "long_streams", "wire")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "platform": platform.platform()}


async def run_with_workers(args: argparse.Namespace, only: set[str], root: Path) -> list[Figure]:
    q = args.quick
    started = time.perf_counter()
    paths = build_models(root)
    print(f"built the bench models in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    workers = [spawn(paths["llama-sp"], "llama-sp"), spawn(paths["gpt2-bpe"], "gpt2-bpe")]
    extra: list[Worker] = []

    async def third() -> Worker:
        if not extra:
            import shutil

            shutil.copytree(paths["llama-sp"], root / "llama-sp-b")
            extra.append(spawn(root / "llama-sp-b", "llama-sp-b"))
        return extra[0]

    figures: list[Figure] = []
    try:
        if "gac" in only:
            figures += await figure_gac(workers, rounds=3 if q else 10, tokens=24 if q else 48)
        if "streams" in only:
            figures += await figure_streams(workers, rounds=1 if q else 2, tokens=12 if q else 24)
        rounds, tokens = (1, 16) if q else (2, 32)
        if "strategies" in only:
            figures += await figure_threshold(workers, rounds, tokens)
            figures += await figure_me(workers, third, rounds, 12 if q else 16)
        if only & {"strategies", "safe"}:
            # Six rounds: one 32-token round's SAFE / alone on tiny models swings 0.89-1.16x on this machine.
            figures += await figure_safe(workers, third, 1 if q else 6, tokens)
            figures += await figure_safe_real(rounds + 1, 24)
        if "strategies" in only:
            figures += await figure_other_strategies(workers, rounds, tokens)
    finally:
        for w in workers + extra:
            w.process.stop()
    return figures


async def run(args: argparse.Namespace) -> list[Figure]:
    only = set(args.only.split(",")) if args.only else set(FIGURES)
    unknown = only - set(FIGURES)
    if unknown:
        raise SystemExit(f"--only: unknown figures {sorted(unknown)}, expected some of {FIGURES}")
    figures: list[Figure] = []
    if only & {"gac", "streams", "strategies", "safe"}:
        with tempfile.TemporaryDirectory(prefix="chorus-bench-") as tmp:
            figures += await run_with_workers(args, only, Path(tmp))
    if "engine" in only:
        # Its real-model figures run engines on event loops of their own (asyncio.run): not on this one.
        figures += await asyncio.to_thread(figure_engine, args.quick)
    if "few_rows" in only:
        figures += figure_few_rows(args.quick)
    if "long_streams" in only:
        figures += await figure_long_streams(args.quick)
    if "cpu" in only:
        figures += figure_cpu(args.quick)
    if "wire" in only:
        figures += await figure_wire(args.quick)
    if "memory" in only:
        figures += await figure_memory(*((50, 500) if args.quick else (500, 5000)))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run in a couple of minutes")
    parser.add_argument("--json", default="bench.json", help="write the figures here (default bench.json)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(FIGURES)}")
    args = parser.parse_args()
    started = time.perf_counter()
    figures = asyncio.run(run(args))
    elapsed = time.perf_counter() - started
    info = machine()
    text = table(figures)
    print(
        f"\nChorus bench ({'quick' if args.quick else 'full'}), {datetime.date.today()}, "
        f"{info['nproc']} cores, {info['cpu']}, {elapsed:.0f} s\n"
    )
    print(text)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "elapsed_s": round(elapsed, 1),
        "machine": info,
        "strategies": sorted(STRATEGIES),
        "figures": [{**asdict(f), "status": f.status} for f in figures],
        "table": text,
    }
    Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
