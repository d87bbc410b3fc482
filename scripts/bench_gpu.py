"""The GPU bench: Chorus's worker engine on one GPU with randomly initialised members of real shapes.

    python scripts/bench_gpu.py [--tiny] [--json bench-gpu.json]      (make bench-gpu)

Members: Llama-3.1-8B and Qwen2.5-7B, built from their configs with random weights in bfloat16 on the
GPU (no download: the weights do not change the cost). `--tiny` (the default without CUDA) runs the same
figures with tiny shapes on the CPU, to check the script (tests/test_bench_gpu.py). Figures, each measured
side by side in one run (medians):

1. each member's decode tokens/s at batch 1, 8 and 32 (context 512) through the engine, its ragged form
   and its static decode form (CUDA graphs on CUDA), against
   transformers' `generate` with a static cache (same model, same batch; its per-token time from a
   64-token and a 1-token generate), and against the memory-bandwidth limit: (weights + the KV bytes a
   step reads) / 4.3 TB/s (H200);
2. GaC of the two on one GPU: a step of both engines plus the coordinator's mix of their full
   distributions, against the sum of the two engines' steps alone, at batch 1 and 32;
3. ME / GaC tokens/s at saturation (batch 32): ME draws one model per token (weights 1:1, seeded) and the
   other catches up on the tokens it missed in its next pass; GaC runs both every token.
4. burst (issue 19's target, whose premise is a GPU's: a pass carrying a prefill chunk costs about a decode
   pass): 16 streams whose 64- and 1,536-token prompts arrive together at the engine of the first member,
   the median gap between tokens over their first 12 and over the rest, against a bare batch-16 decode
   forward (a StaticCache forward); targets 1.3x and 1.15x.
It finishes in under 8 minutes on one H200.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_engine  # noqa: E402

H200_BANDWIDTH = 4.3e12  # bytes/s
LLAMA_3_1_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
QWEN2_5_7B = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
}


def _median_time(fn: Any, rounds: int) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(rounds))


def _kv_bytes_per_token(config: dict[str, Any], dtype: torch.dtype) -> int:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * torch.finfo(dtype).bits // 8


def _generate_per_token(model: Any, batch: int, prompt: int, device: torch.device, rounds: int, new: int) -> float:
    """Seconds per decode step of transformers' generate with a static cache (prefill excluded): from a
    generate of `new` tokens and one of a single token."""
    ids = torch.randint(10, 1000, (batch, prompt), device=device)

    def run(n: int) -> float:
        bench_engine._sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static", pad_token_id=0
            )
        bench_engine._sync(device)
        return time.perf_counter() - started

    long, short = _median_time(lambda: run(new), rounds), _median_time(lambda: run(1), rounds)
    return (long - short) / (new - 1)


def member_figures(
    name: str,
    config: dict[str, Any],
    model: Any,
    device: torch.device,
    dtype: torch.dtype,
    batches: tuple[int, ...],
    context: int,
    rounds: int,
) -> list[dict[str, Any]]:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for batch in batches:
        engine = bench_engine.EngineDecode(model, batch, context, device)
        ours = _median_time(engine.step, rounds)
        del engine
        # The static decode form: bucketed shapes, captured as CUDA graphs on CUDA (eager elsewhere).
        engine = bench_engine.EngineDecode(model, batch, context, device, static=True)
        graphs = _median_time(engine.step, rounds)
        del engine
        theirs = _generate_per_token(model, batch, context, device, max(1, rounds // 3), 64 if rounds > 3 else 8)
        step_bytes = weights + batch * context * _kv_bytes_per_token(config, dtype)
        bound = batch / (step_bytes / H200_BANDWIDTH)
        rows.append(
            {
                "model": name,
                "batch": batch,
                "context": context,
                "engine_tok_s": batch / ours,
                "engine_graphs_tok_s": batch / graphs,
                "graphs_vs_eager": ours / graphs,
                "generate_static_tok_s": batch / theirs,
                "bandwidth_bound_tok_s": bound,
                "engine_vs_generate": theirs / ours,
                "engine_vs_bound": (batch / ours) / bound,
            }
        )
    return rows


def _mix_cost(vocabs: tuple[int, int], rounds: int) -> float:
    """Seconds the coordinator spends per step mixing two full fp16 distributions of these sizes."""
    from bench import coordinator_cpu_per_step

    result = coordinator_cpu_per_step(2, max(vocabs), "full", steps=rounds)
    return result["median_us"] / 1e6


def gac_figures(
    models: dict[str, Any], configs: dict[str, dict[str, Any]], device: torch.device, context: int, rounds: int
) -> list[dict[str, Any]]:
    names = list(models)
    mix = _mix_cost(tuple(configs[n]["vocab_size"] for n in names), rounds)  # type: ignore[arg-type]
    rows = []
    for batch in (1, 32):
        a, b = (bench_engine.EngineDecode(models[n], batch, context, device) for n in names)
        alone = _median_time(a.step, rounds) + _median_time(b.step, rounds)
        # A GaC step: both members, then the coordinator's mix of every session's two distributions.
        together = _median_time(lambda a=a, b=b, batch=batch: a.step() + b.step() + mix * batch, rounds)
        rows.append(
            {
                "batch": batch,
                "gac_step_s": together,
                "sum_alone_s": alone,
                "ratio": together / alone,
                "mix_s_per_session": mix,
            }
        )
        del a, b
    return rows


def me_figure(models: dict[str, Any], device: torch.device, context: int, tokens: int, seed: int = 0) -> dict:
    """ME and GaC tokens/s at batch 32 over `tokens` tokens: real passes, catch-ups included."""
    names = list(models)
    engines = [bench_engine.EngineDecode(models[n], 32, context, device) for n in names]
    for e in engines:
        e.step()
    rng = np.random.default_rng(seed)
    schedule = rng.integers(0, 2, size=tokens)
    missed = [0, 0]
    started = time.perf_counter()
    for chosen in schedule:
        engines[chosen].step(tokens=missed[chosen] + 1)
        missed[chosen], missed[1 - chosen] = 0, missed[1 - chosen] + 1
    me_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(tokens):
        engines[0].step()
        engines[1].step()
    gac_s = time.perf_counter() - started
    return {
        "batch": 32,
        "tokens": tokens,
        "me_tok_s": 32 * tokens / me_s,
        "gac_tok_s": 32 * tokens / gac_s,
        "ratio": gac_s / me_s,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = ["| figure | value |", "| --- | --- |"]
    for r in report["members"]:
        lines.append(
            f"| {r['model']} decode, batch {r['batch']} (context {r['context']}) | {r['engine_tok_s']:.0f} tok/s; "
            f"static form (CUDA graphs on CUDA) {r['engine_graphs_tok_s']:.0f} ({r['graphs_vs_eager']:.2f}x); "
            f"generate+static {r['generate_static_tok_s']:.0f} ({r['engine_vs_generate']:.2f}x); "
            f"bandwidth limit {r['bandwidth_bound_tok_s']:.0f} ({100 * r['engine_vs_bound']:.0f}%) |"
        )
    for r in report["gac"]:
        lines.append(f"| GaC of both on one GPU, batch {r['batch']}: step / sum of the two alone | {r['ratio']:.2f}x |")
    me = report["me"]
    lines.append(
        f"| ME / GaC tokens/s at batch 32 | {me['ratio']:.2f}x ({me['me_tok_s']:.0f} vs {me['gac_tok_s']:.0f}) |"
    )
    first = report["members"][0]["model"]
    for r in report["burst"]:
        lines.append(
            f"| {first}, {report['burst_streams']} streams of {r['prompt_tokens']}-token prompts arriving together: "
            f"median gap over the first 12 tokens / bare decode forward (target 1.3x); after them (target 1.15x) | "
            f"{r['burst_ratio']:.2f}x ({r['burst_gap_ms']:.1f} vs {r['bare_forward_ms']:.1f} ms); "
            f"{r['steady_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (the default without CUDA)")
    parser.add_argument("--json", type=Path, default=Path("bench-gpu.json"))
    args = parser.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    configs = {"llama-3.1-8b": LLAMA_3_1_8B, "qwen2.5-7b": QWEN2_5_7B}
    if tiny:
        configs = {n: {**c, **TINY} for n, c in configs.items()}
    rounds, context, me_tokens = (2, 32, 8) if tiny else (10, 512, 128)
    burst_lengths, streams = ((16, 48), 4) if tiny else ((64, 1536), 16)
    started = time.perf_counter()
    models = {n: bench_engine.random_model(c, dtype, str(device)) for n, c in configs.items()}
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if not tiny else "cpu (tiny shapes)",
        "dtype": str(dtype).removeprefix("torch."),
        "members": [],
    }
    for name, model in models.items():
        report["members"] += member_figures(name, configs[name], model, device, dtype, (1, 8, 32), context, rounds)
    report["gac"] = gac_figures(models, configs, device, context, rounds)
    report["me"] = me_figure(models, device, context, me_tokens)
    report["burst_streams"] = streams
    first = next(iter(models.values()))
    report["burst"] = [bench_engine.engine_burst(first, device, length, streams) for length in burst_lengths]
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    report["table"] = markdown(report)
    print(f"\nChorus GPU bench, {report['device']}, {report['dtype']}, {report['elapsed_s']:.0f} s\n")
    print(report["table"])
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
