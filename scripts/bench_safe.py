"""SAFE against GaC on the real pair: SmolLM2-135M-Instruct drafting, Gemma 3 270M verifying.

    python scripts/bench_safe.py [--rounds 3] [--tokens 24] [--fixed 2 5] [--gac-twice] [--json bench-safe.json]

Seven everyday prompts, greedy, `--tokens` tokens each. The strategies run interleaved in one
process (GaC, SAFE, SAFE, GaC, GaC, SAFE, ... on each prompt, the order reversed every other round;
medians per prompt), so the machine's noise falls on both alike: the figures are ratios, SAFE ÷ GaC
ms/token and forward passes per token, per prompt. `--fixed N ...` adds SAFE with fixed drafts of N
tokens (`safe: {adaptive: false, draft_tokens: N}`, a coordinator of its own on the same workers), to
see what drafting costs where the lockstep of adaptive SAFE does not draft. `--gac-twice` runs GaC a
second time as a variant of its own (the same requests, interleaved alike): its ratio to GaC is the
measurement's own spread, the noise floor of the SAFE ratios. It also writes each
strategy's output text, to compare SAFE's output before and after a change (`--json`).
`scripts/bench.py --only safe` runs the same figure (`figure_safe_real`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import chorus  # noqa: E402
from chorus_local import cluster  # noqa: E402
from coordinator.config import ModelSpec, parse_config  # noqa: E402

# Everyday prompts a new user would try: facts, code, other languages and scripts, lists, chat.
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "Le chat est",
    "我爱北京",
    "Party time 🎉🎉 let's",
    "1. apples\n2.",
    "Here is a short recipe for pancakes:",
)
SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"


def real_config(addresses: dict[str, str], paths: dict[str, Path], safe: dict[str, Any] | None = None) -> Any:
    """configs/real.yaml's ensemble (full float32 distributions, equal weights), SmolLM2 primary and drafter;
    `safe`: further SAFE settings."""
    models = [
        {"name": "smollm2", "path": str(paths[SMOL]), "address": addresses[SMOL], "priority": "primary"},
        {"name": "gemma3", "path": str(paths[GEMMA]), "address": addresses[GEMMA]},
    ]
    return parse_config(
        {
            "models": models,
            "strategy": "gac",
            "server": {"port": 0},
            "transport": {"top_k": 0, "dtype": "float32"},
            "safe": {"drafter": "smollm2", **(safe or {})},
            "limits": {"step_timeout_s": 60.0, "first_step_timeout_s": 120.0},
        },
        ROOT,
    )


async def _one(client: chorus.AsyncClient, prompt: str, strategy: str, tokens: int) -> dict[str, Any]:
    started = asyncio.get_running_loop().time()
    result = await client.generate(prompt=prompt, max_new_tokens=tokens, strategy=strategy, temperature=0.0)
    wall = asyncio.get_running_loop().time() - started
    steps = max(1, result.usage.steps)
    return {
        "text": result.text,
        "ms_per_token": wall * 1e3 / steps,
        "passes_per_token": sum(m.forward_passes for m in result.usage.models) / steps,
        "ensembled": result.usage.steps_ensembled,
        "steps": result.usage.steps,
    }


async def compare(
    rounds: int, tokens: int, log_dir: Path, fixed: tuple[int, ...] = (), gac_twice: bool = False
) -> dict[str, Any]:
    """Per prompt: GaC's and SAFE's median ms/token and forward passes per token, their ratios, the texts;
    with `fixed`, the same for SAFE with fixed drafts of each of those lengths; with `gac_twice`, GaC's
    second run against its first."""
    from bench import worker_output_to

    from model_worker import catalog

    paths = {name: catalog.prepare(name, log=False) for name in (SMOL, GEMMA)}
    workers: dict[str, cluster.WorkerProcess] = {}
    # variant -> (strategy, further SAFE settings); each variant's settings get a coordinator of their own
    variants: dict[str, tuple[str, dict[str, Any]]] = {"gac": ("gac", {}), "safe": ("safe", {})}
    variants.update({_fixed(n): ("safe", {"adaptive": False, "draft_tokens": n}) for n in fixed})
    if gac_twice:
        variants[_AGAIN] = ("gac", {})
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(lambda: [w.stop() for w in workers.values()])
        for name in (SMOL, GEMMA):
            spec = ModelSpec(name=name, path=str(paths[name]), max_model_len=2048)
            with worker_output_to(log_dir / "workers.log"):
                workers[name] = cluster.spawn_worker(spec, timeout=600, threads=1)
        addresses = {n: w.address for n, w in workers.items()}
        clients: dict[str, chorus.AsyncClient] = {}
        by_settings: dict[str, chorus.AsyncClient] = {}  # one coordinator per distinct SAFE settings
        for variant, (_, safe) in variants.items():
            key = json.dumps(safe, sort_keys=True)
            if key not in by_settings:
                config = real_config(addresses, paths, safe)
                running = await cluster.start_coordinator(config, [m.address for m in config.models], port=0)  # type: ignore[misc]
                stack.push_async_callback(running.stop, grace=0)
                client = chorus.AsyncClient(f"127.0.0.1:{running.port}", timeout=600)
                by_settings[key] = await stack.enter_async_context(client)
            clients[variant] = by_settings[key]
        await _one(clients["gac"], PROMPTS[0], "gac", 4)  # warm both workers
        per_prompt = []
        for prompt in PROMPTS:
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            for r in range(rounds):
                # The order reverses every other round: no variant always finds another's prompt blocks
                # in the prefix cache, or the machine warmed by another's run.
                for variant in list(runs)[:: 1 if r % 2 == 0 else -1]:
                    runs[variant].append(await _one(clients[variant], prompt, variants[variant][0], tokens))
            per_prompt.append(_summary(prompt, runs, fixed))
    return {"rounds": rounds, "tokens": tokens, "fixed": list(fixed), "prompts": per_prompt}


def _fixed(n: int) -> str:
    return f"safe_fixed_{n}"


_AGAIN = "gac_again"  # GaC's second run, with --gac-twice


def _summary(prompt: str, runs: dict[str, list[dict[str, Any]]], fixed: tuple[int, ...] = ()) -> dict[str, Any]:
    def med(variant: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[variant]))

    def ratios(variant: str) -> dict[str, float]:
        return {
            "ms_ratio": med(variant, "ms_per_token") / med("gac", "ms_per_token"),
            "passes_ratio": med(variant, "passes_per_token") / med("gac", "passes_per_token"),
        }

    return {
        "prompt": prompt,
        **ratios("safe"),
        **{f"{s}_{k}": med(s, k) for s in runs for k in ("ms_per_token", "passes_per_token", "ensembled")},
        "fixed": {str(n): ratios(_fixed(n)) for n in fixed},
        **({"gac_again_ms_ratio": ratios(_AGAIN)["ms_ratio"]} if _AGAIN in runs else {}),
        "texts": {s: runs[s][0]["text"] for s in runs},
        "deterministic": all(len({r["text"] for r in runs[s]}) == 1 for s in runs),
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{'prompt':<40} {'GaC ms/tok':>10} {'SAFE ms/tok':>11} {'ms ratio':>8} "
        f"{'GaC fp/tok':>10} {'SAFE fp/tok':>11} {'ensembled':>9}"
        + "".join(f" {'fixed ' + n:>14}" for n in result["prompts"][0]["fixed"])
        + (f" {'GaC again':>9}" if "gac_again_ms_ratio" in result["prompts"][0] else "")
    ]
    for p in result["prompts"]:
        lines.append(
            f"{p['prompt'][:40]!r:<40} {p['gac_ms_per_token']:>10.0f} {p['safe_ms_per_token']:>11.0f} "
            f"{p['ms_ratio']:>7.2f}x {p['gac_passes_per_token']:>10.2f} {p['safe_passes_per_token']:>11.2f} "
            f"{p['safe_ensembled']:>9.0f}"
            + "".join(f" {r['ms_ratio']:>6.2f}x {r['passes_ratio']:>5.2f}fp" for r in p["fixed"].values())
            + (f" {p['gac_again_ms_ratio']:>8.2f}x" if "gac_again_ms_ratio" in p else "")
        )
    worst = max(p["ms_ratio"] for p in result["prompts"])
    worst_passes = max(p["passes_ratio"] for p in result["prompts"])
    pooled = sum(p["safe_ms_per_token"] for p in result["prompts"]) / sum(
        p["gac_ms_per_token"] for p in result["prompts"]
    )
    lines.append(
        f"worst SAFE / GaC ms/token {worst:.2f}x, forward passes/token {worst_passes:.2f}x; "
        f"all prompts pooled: {pooled:.2f}x"
    )
    if result["prompts"][0]["fixed"]:
        lines.append("fixed N: SAFE with fixed N-token drafts ÷ GaC, ms/token and forward passes per token")
    if "gac_again_ms_ratio" in result["prompts"][0]:
        spread = [p["gac_again_ms_ratio"] for p in result["prompts"]]
        lines.append(f"GaC again ÷ GaC ms/token (the noise floor): {min(spread):.2f}-{max(spread):.2f}x")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per prompt and strategy")
    parser.add_argument("--tokens", type=int, default=24, help="tokens generated per run")
    parser.add_argument("--fixed", type=int, nargs="*", default=[], help="also SAFE with fixed drafts of these lengths")
    parser.add_argument("--gac-twice", action="store_true", help="also GaC again, for the measurement's own spread")
    parser.add_argument("--json", default="bench-safe.json", help="write the figures and texts here")
    args = parser.parse_args()
    if any(not 1 <= n <= 64 for n in args.fixed):
        parser.error("--fixed: draft lengths are 1 to 64 (safe.draft_tokens)")
    with tempfile.TemporaryDirectory(prefix="chorus-bench-safe-") as tmp:
        result = asyncio.run(compare(args.rounds, args.tokens, Path(tmp), tuple(args.fixed), args.gac_twice))
    print(report(result))
    Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
