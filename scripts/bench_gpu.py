"""The GPU bench: Chorus's worker engine on one GPU with randomly initialised members of real shapes.

    python scripts/bench_gpu.py [--tiny] [--json bench-gpu.json]      (make bench-gpu)

Members: Llama-3.1-8B and Qwen2.5-7B, built from their configs with random weights in bfloat16 on the
GPU (no download: the weights do not change the cost). `--tiny` (the default without CUDA) runs the same
figures with tiny shapes on the CPU, to check the script (tests/test_bench_gpu.py). Figures, each measured
side by side in one run (medians):

1. each member's decode tokens/s at batch 1, 8 and 32 (context 512) through the engine, its ragged form
   and its static decode form (CUDA graphs on CUDA; how many buckets were captured is reported; and the
   static form again with the explicit attention products the CPU uses instead of the fused SDPA), against
   transformers' `generate` with a static cache, eager (same model, same batch; its per-token time from a
   64-token and a 1-token generate), and against the memory-bandwidth limit: (weights + the KV bytes a
   step reads) / 4.3 TB/s (H200);
2. burst (issue 19's target, whose premise is a GPU's: a pass carrying a prefill chunk costs about a decode
   pass): 16 streams whose 64- and 1,536-token prompts arrive together at the engine of the first member,
   the median gap between tokens over their first 12 and over the rest, against a bare batch-16 decode
   forward (a StaticCache forward); targets 1.3x and 1.15x; both with the worker's default
   `--decode-stretch`, and the longer prompts again with it off (0);
3. the first member's decode step (ragged form) at 16 sessions and 64 / 512 / 1,536 tokens against an
   in-place StaticCache forward (issue 19's no-regression figure, <= 1.15x);
4. GaC of the two on one GPU: a step of both engines plus the coordinator's mix of their full
   distributions, against the sum of the two engines' steps alone, at batch 1 and 32 (decodes replayed as
   CUDA graphs, as the worker runs them);
5. ME / GaC tokens/s at saturation (batch 32): ME draws one model per token (weights 1:1, seeded) and the
   other catches up on the tokens it missed in its next pass (the static form up to 8 tokens, a ragged pass
   beyond); GaC runs both every token;
6. if 150 s of `--budget-s` are left: the first member's `generate` with a static cache compiled, as
   transformers does on CUDA by default (torch.compile with CUDA graphs), at batch 1 and 32;
7. the worker *server* (`python -m model_worker`, a subprocess answering gRPC, CUDA graphs on) with a
   SmolLM2-shaped model: 1 and 32 sessions drawing greedy tokens at once (Draft calls, after two untimed),
   tokens/s against the engine stepping the same batch in this process (after an untimed round), its passes,
   their mean batch and its host time per token from the worker's own metrics, and every session's text
   against `generate`.
First of all (not numbered: a check, not a speed) the engine's output rows on the device against a plain
forward of the same model (`agreement`). The sections' keys: agreement, server, members, burst, decode_ratio,
gac, me, generate_compiled: the order they run in (`--only` takes these keys).
Each section that fails is reported with its error and the others still run; the JSON is rewritten after
every section, so a run stopped at a time limit keeps what it measured. Without a venv (the GPU machine has
torch, transformers and grpcio but no index to install from) run it as `python3 scripts/bench_gpu.py`.
It finishes in under 8 minutes on one H200.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# Training the server section's tokenizer (tests.tokenizer_factory) starts the tokenizers library's thread
# pool, whose threads then contend with torch's: on 2 cores the engine's steps in this process ran about 100x
# slower after it (`--tiny`: 290 ms against 3 ms). Nothing here needs that pool.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_engine  # noqa: E402

from model_worker import paged_attention  # noqa: E402

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


def _generate_per_token(
    model: Any, batch: int, prompt: int, device: torch.device, rounds: int, new: int, compiled: bool = False
) -> float:
    """Seconds per decode step of transformers' generate with a static cache (prefill excluded): from a
    generate of `new` tokens and one of a single token. Eager unless `compiled`: on CUDA, generate then
    compiles the forward (torch.compile, CUDA graphs) once per batch shape, which takes about a minute each."""
    ids = torch.randint(10, 1000, (batch, prompt), device=device)

    def run(n: int) -> float:
        bench_engine._sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=0,
                disable_compile=not compiled,
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
        captured = engine.engine.runner.static.captured
        del engine
        # The same with the explicit attention products instead of the fused SDPA kernel (the CPU's form).
        fused_on, paged_attention.FUSED_ON = paged_attention.FUSED_ON, ()
        try:
            engine = bench_engine.EngineDecode(model, batch, context, device, static=True)
            explicit = _median_time(engine.step, rounds)
            del engine
        finally:
            paged_attention.FUSED_ON = fused_on
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
                "graphs_captured": captured,
                "engine_graphs_explicit_tok_s": batch / explicit,
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
    from bench_coordinator import coordinator_cpu_per_step

    result = coordinator_cpu_per_step(2, max(vocabs), "full", steps=rounds)
    return result["median_us"] / 1e6


def gac_figures(
    models: dict[str, Any], configs: dict[str, dict[str, Any]], device: torch.device, context: int, rounds: int
) -> list[dict[str, Any]]:
    names = list(models)
    mix = _mix_cost(tuple(configs[n]["vocab_size"] for n in names), rounds)  # type: ignore[arg-type]
    rows = []
    for batch in (1, 32):
        a, b = (bench_engine.EngineDecode(models[n], batch, context, device, static=True) for n in names)
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
    """ME and GaC tokens/s at batch 32 over `tokens` tokens: real passes, catch-ups included. Every pass length
    either one runs is run once before the timing (on CUDA, each new shape is captured as a graph once per
    server lifetime: that first capture is no part of the steady state)."""
    names = list(models)
    engines = [bench_engine.EngineDecode(models[n], 32, context, device, static=True) for n in names]
    rng = np.random.default_rng(seed)
    schedule = rng.integers(0, 2, size=tokens)
    passes, missed = [], [0, 0]
    for chosen in schedule:
        passes.append((int(chosen), missed[chosen] + 1))
        missed[chosen], missed[1 - chosen] = 0, missed[1 - chosen] + 1
    for e in engines:
        for length in sorted({n for _, n in passes} | {1}):
            e.step(tokens=length)
    started = time.perf_counter()
    for chosen, length in passes:
        engines[chosen].step(tokens=length)
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


def agreement_figures(
    configs: dict[str, dict[str, Any]], device: torch.device, lengths: tuple[int, ...], streams: int, tokens: int
) -> list[dict[str, Any]]:
    """The engine's output rows on this device against a plain forward of the same model (transformers'
    SDPA, no cache) over the same tokens: float32 models of SmolLM2's and Gemma 3's shapes (random weights),
    `streams` prompts per length arriving together, `tokens` steps each (a greedy token, every fourth step
    with two random tokens after it: a piece of three), through the worker's defaults (CUDA graphs on CUDA:
    every short feed after the prompts is a graph replay). Prompts past Gemma 3's 512-token window check
    its sliding layers."""
    import asyncio

    from model_worker.engine import Engine
    from model_worker.kv_layout import KVLayout
    from model_worker.kv_manager import KVManager

    rows = []
    for name, config in configs.items():
        model = bench_engine.random_model(config, torch.float32, str(device))
        layout = KVLayout.of(model.config, torch.float32)
        generator = torch.Generator().manual_seed(1)
        prompts = [
            torch.randint(10, model.config.vocab_size, (n,), generator=generator).tolist()
            for n in lengths
            for _ in range(streams)
        ]
        kv = KVManager(layout, 0, len(prompts), max(lengths) + 3 * tokens + 1, 16, device)
        vocab = model.config.vocab_size
        engine = Engine(model, device, kv, "agreement", cuda_graphs=device.type == "cuda")
        engine.runner.static.enabled = True  # decodes take the static form off CUDA too (eager there)
        engine.warm_up()

        async def stream(
            prompt: list[int], engine: Engine = engine, vocab: int = vocab
        ) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
            cache = engine.new_cache(prompt)
            assert cache is not None, "the pool holds every stream"
            fed, new, out = list(prompt), prompt[len(cache.ids) :], []
            rng = random.Random(len(prompt))
            for step in range(tokens):
                position = len(cache.ids) + len(new) - 1
                await engine.forward(cache, new, {position})
                row = cache.rows[position].float().cpu()
                out.append((position, row))
                new = [int(row.argmax())]
                if step % 4 == 2:  # now and then a piece of three tokens (a catch-up, a re-tokenized piece)
                    new += [rng.randrange(10, vocab) for _ in range(2)]
                fed += new
                cache.keep_rows(set())
            engine.release(cache)
            return fed[: len(fed) - len(new)], out

        async def run(
            engine: Engine = engine, prompts: list[list[int]] = prompts
        ) -> list[tuple[list[int], list[tuple[int, torch.Tensor]]]]:
            engine.start()
            results = await asyncio.gather(*(stream(p) for p in prompts))
            await engine.stop()
            return list(results)

        results = asyncio.run(run())
        agree, largest = 0, 0.0
        for fed, got in results:
            with torch.inference_mode():
                full = model(input_ids=torch.tensor([fed], device=device)).logits[0].float().cpu()
            largest = max(largest, max(float((row - full[p]).abs().max()) for p, row in got))
            agree += all(int(row.argmax()) == int(full[p].argmax()) for p, row in got)
        rows.append(
            {
                "model": name,
                "prompt_tokens": list(lengths),
                "streams": len(prompts),
                "tokens": tokens,
                "agreeing_streams": agree,
                "largest_logit_diff": largest,
                "graphs_captured": engine.runner.static.captured,
            }
        )
        del engine, kv, model
    return rows


def _prompt(rng: random.Random, words: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(words))


PHASES = ("dispatch", "wait", "prepare", "forward", "rows", "return", "device")  # model_worker/pass_clock.py


def _pass_phases(text: str, model_name: str) -> dict[str, float]:
    """From a worker's Prometheus metrics text, for one model name: its forward passes' and batch sizes' sums
    and counts, the CUDA graphs it captured, and each pass phase's seconds and observations so far
    (`phase:<name>`, `count:<name>`)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model_name") != model_name:
                continue
            if family.name == "chorus_worker_pass_phase_seconds" and sample.name.endswith(("_sum", "_count")):
                kind = "phase" if sample.name.endswith("_sum") else "count"
                out[f"{kind}:{sample.labels['phase']}"] = sample.value
            elif family.name in ("chorus_worker_forward_seconds", "chorus_worker_batch_size") and sample.name.endswith(
                ("_sum", "_count")
            ):
                out[sample.name] = sample.value
            elif sample.name == "chorus_worker_cuda_graph_captures_total":
                out["captures"] = sample.value
    return out


def _profile_summary(path: Path, top: int = 30, least: int = 20) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's raw (collapsed) stacks, per thread with at least `least` samples: the functions with the
    largest share of its samples, counted inclusively (once per stack that holds them)."""
    totals: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        thread, *frames = stack.split(";")
        totals[thread] = totals.get(thread, 0) + int(n)
        seen = counts.setdefault(thread, {})
        for name in {f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0] for f in frames}:
            seen[name] = seen.get(name, 0) + int(n)
    return {
        f"{thread} ({totals[thread]} samples)": [
            (name, round(n / totals[thread], 3)) for name, n in sorted(seen.items(), key=lambda kv: -kv[1])[:top]
        ]
        for thread, seen in counts.items()
        if totals[thread] >= least
    }


def _phase_ms(during: dict[str, float]) -> dict[str, float]:
    """Mean milliseconds per pass of each phase measured (phases the worker does not run are left out)."""
    return {p: during[f"phase:{p}"] / during[f"count:{p}"] * 1e3 for p in PHASES if during.get(f"count:{p}", 0) > 0}


def server_figures(
    config: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    batches: tuple[int, ...],
    prompt_words: int,
    tokens: int,
    workdir: Path,
    switch_intervals: tuple[float | None, ...] = (None,),
    profile: Path | None = None,
) -> list[dict[str, Any]]:
    """The worker *server* on this device, as a pod runs it (`python -m model_worker`, gRPC), against the
    engine in this process on the same weights. A model of `config`'s shape (random weights) with a
    locally trained byte-level BPE tokenizer (a few hundred tokens: the vocabulary is the tokenizer's; no
    download) is saved and served; per batch, that many sessions open with distinct prompts, draw two
    greedy tokens (their prefill and a first decode), then `tokens` more each in one Draft call, all at
    once, twice (new sessions, same prompts; the first round untimed, so that no CUDA graph is captured
    while timing): the server's tokens/s, against the engine stepping the same batch in process at the
    longest session's context halfway through (the width of the server's passes), in the decode form the
    worker runs there (static on CUDA, ragged on a CPU). Each session's greedy tokens are checked against
    transformers' `generate` on the saved model (in bfloat16 the two round attention differently and may
    part at near-ties: counted, not asserted). The worker's own metrics over the timed Draft calls split
    its wall time: the passes it ran, their mean batch, its host time per drawn token (the wall time
    outside forward passes, as bench_engine.draft_host_time counts it in process), and each pass's phases
    (model_worker/pass_clock.py) beside the same phases of the engine's steps in process.
    `switch_intervals`: a worker per value, with Python's thread switch interval set to it (None: as is;
    the forward thread and the event loop share one interpreter lock). `profile`: py-spy samples the (first)
    worker over further rounds of the largest batch, its stacks written there and summarised in the row."""
    import asyncio
    import socket
    import urllib.request

    from prometheus_client import REGISTRY, generate_latest
    from transformers import AutoModelForCausalLM

    from chorus_common.types import Prompt, SamplingParams
    from coordinator.workers import WorkerClient
    from model_worker.token_bytes import token_byte_table
    from tests.tokenizer_factory import byte_level_bpe

    tokenizer = byte_level_bpe()
    path = workdir / "server-model"
    tokenizer.save_pretrained(path)
    shape = {**config, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    model = bench_engine.random_model(shape, dtype, str(device))
    with torch.no_grad():  # specials score 0 (never the largest): generations run their whole length
        specials = tokenizer.all_special_ids
        model.get_output_embeddings().weight[specials] = 0.0
    model.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()  # as the worker loads it
    table, _ = token_byte_table(tokenizer, len(tokenizer))
    rng = random.Random(0)
    prompts = [_prompt(rng, prompt_words) for _ in range(max(batches))]
    generated: dict[int, bytes] = {}  # prompt index -> generate's greedy text

    def agreeing(texts: list[bytes]) -> int:
        for i in range(len(texts)):
            if i not in generated:
                ids = tokenizer(prompts[i], return_tensors="pt").input_ids.to(device)
                with torch.inference_mode():
                    out = model.generate(ids, max_new_tokens=tokens + 2, do_sample=False, pad_token_id=0)
                generated[i] = b"".join(table[int(t)] for t in out[0, ids.shape[1] :])
        return sum(text == generated[i] for i, text in enumerate(texts))

    engines: dict[int, dict[str, Any]] = {}

    def engine_figures(batch: int) -> dict[str, Any]:
        """The engine in this process, the same batch at the longest session's context halfway through the
        timed drafts (a pass's block width is its longest session's), in the decode form the worker runs
        there: static (graphs) on CUDA, ragged elsewhere."""
        if batch not in engines:
            context = max(len(tokenizer(p).input_ids) for p in prompts[:batch]) + 2 + tokens // 2
            engine = bench_engine.EngineDecode(model, batch, context, device, static=device.type == "cuda")
            for _ in range(2):  # its first pass (a capture on CUDA), and the one whose device time the next reads
                engine.step()
            before = _pass_phases(generate_latest(REGISTRY).decode(), "bench")
            tok_s = batch / _median_time(engine.step, 5)
            after = _pass_phases(generate_latest(REGISTRY).decode(), "bench")
            during = {k: v - before.get(k, 0.0) for k, v in after.items()}
            engines[batch] = {"context": context, "engine_tok_s": tok_s, "engine_phase_ms": _phase_ms(during)}
            del engine
        return engines[batch]

    rows = []
    for interval in switch_intervals:
        port_file = workdir / f"server-port-{interval}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            metrics_port = s.getsockname()[1]

        def passes() -> dict[str, float]:
            url = f"http://127.0.0.1:{metrics_port}/metrics"  # noqa: B023 - read while this worker runs
            return _pass_phases(urllib.request.urlopen(url, timeout=10).read().decode(), "server-model")

        options = {
            "--model": path,
            "--device": device.type,
            "--dtype": str(dtype).removeprefix("torch."),
            "--port": 0,
            "--port-file": port_file,
            "--max-model-len": 8 * prompt_words + tokens + 64,
            "--kv-budget-mib": 2048,
            "--max-sessions": max(batches),
            "--metrics-port": metrics_port,
        }
        launch = ["-m", "model_worker"]
        if interval is not None:  # the worker module run after the interpreter's switch interval is set
            code = f"import runpy, sys; sys.setswitchinterval({interval}); runpy.run_module('model_worker', run_name='__main__')"  # noqa: E501
            launch = ["-c", code]
        command = [sys.executable, *launch, *(str(x) for kv in options.items() for x in kv)]
        with _worker_server(command, port_file) as (worker, address):

            async def drive(batch: int) -> tuple[float, list[bytes], str, dict[str, float]]:
                client = WorkerClient(address)
                greedy = SamplingParams()

                async def draw(sessions: list[Any]) -> tuple[list[Any], list[Any], float, dict[str, float]]:
                    opened = zip(sessions, prompts[:batch], strict=True)
                    await asyncio.gather(*(s.open(Prompt(text=p), f"bench-{i}") for i, (s, p) in enumerate(opened)))
                    firsts = await asyncio.gather(*(s.draft(b"", 0, 2, greedy, 0, 0) for s in sessions))  # prefills
                    before = passes()
                    started = time.perf_counter()
                    drafts = await asyncio.gather(*(s.draft(b"", 0, tokens, greedy, 0, 0) for s in sessions))
                    elapsed = time.perf_counter() - started
                    during = {k: v - before.get(k, 0.0) for k, v in passes().items()}
                    for s in sessions:
                        s.cancel()
                    return firsts, drafts, elapsed, during

                try:
                    await client.wait_ready(60)
                    info = await client.info()
                    # A round untimed first, the same sessions' work: on CUDA every pass shape the timed round
                    # meets (its batch, and each width its contexts grow through) is captured then, as a
                    # long-running server has, and the prompts' blocks are in the prefix cache.
                    await draw([client.session(timeout=600) for _ in range(batch)])
                    firsts, drafts, elapsed, during = await draw([client.session(timeout=600) for _ in range(batch)])
                    texts = [b"".join(f.pieces + d.pieces) for f, d in zip(firsts, drafts, strict=True)]
                    drawn = sum(len(d.pieces) for d in drafts)
                    count = during["chorus_worker_forward_seconds_count"]
                    split = {
                        "passes": count,
                        "mean_batch": during["chorus_worker_batch_size_sum"] / max(1.0, count),
                        "in_passes_share": during["chorus_worker_forward_seconds_sum"] / elapsed,
                        "host_us_per_token": (elapsed - during["chorus_worker_forward_seconds_sum"]) / drawn * 1e6,
                        "server_phase_ms": _phase_ms(during),
                        "captures_in_window": during.get("captures", 0.0),
                    }
                    if profile is not None and batch == max(batches):
                        # Rounds more, under a sampling profiler (not timed): where the worker's threads spend it.
                        pid = str(worker.pid)
                        spy = subprocess.Popen(
                            [
                                *("py-spy", "record", "--pid", pid, "--duration", "4", "--rate", "250"),
                                *("--format", "raw", "--threads", "--nonblocking", "--output", str(profile)),
                            ]
                        )
                        while spy.poll() is None:
                            await draw([client.session(timeout=600) for _ in range(batch)])
                        split["profile"] = _profile_summary(profile)
                    return drawn / elapsed, texts, info.device, split
                finally:
                    await client.close()

            for batch in batches:
                server_tok_s, texts, served_on, split = asyncio.run(drive(batch))
                engine = engine_figures(batch)
                rows.append(
                    {
                        "batch": batch,
                        "tokens": tokens,
                        "switch_interval_s": interval,
                        "vocab": len(tokenizer),
                        "served_on": served_on,
                        "server_tok_s": server_tok_s,
                        **engine,
                        "server_vs_engine": server_tok_s / engine["engine_tok_s"],
                        "sessions_equal_to_generate": agreeing(texts),
                        **split,
                    }
                )
    return rows


@contextlib.contextmanager
def _worker_server(command: list[str], port_file: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A worker server started with `command` (which writes its port to `port_file`): the process and its
    address once it listens; stopped on the way out."""
    worker = subprocess.Popen(command, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not (port_file.exists() and port_file.read_text()):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker server did not start (exit code {worker.poll()})")
            time.sleep(0.2)
        yield worker, f"127.0.0.1:{port_file.read_text()}"
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def compiled_generate_figures(
    name: str, model: Any, device: torch.device, batches: tuple[int, ...], context: int, rounds: int, new: int
) -> list[dict[str, Any]]:
    """transformers' generate with a static cache, compiled (what it does on CUDA by default), per batch."""
    rows = []
    for batch in batches:
        per_token = _generate_per_token(model, batch, context, device, rounds, new, compiled=True)
        rows.append({"model": name, "batch": batch, "context": context, "generate_compiled_tok_s": batch / per_token})
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = ["| figure | value |", "| --- | --- |"]
    for r in report.get("members", []):
        graphs = f"{r['graphs_captured']} graph(s)" if report["device"] != "cpu (tiny shapes)" else "eager on a CPU"
        lines.append(
            f"| {r['model']} decode, batch {r['batch']} (context {r['context']}) | {r['engine_tok_s']:.0f} tok/s; "
            f"static form ({graphs}) {r['engine_graphs_tok_s']:.0f} ({r['graphs_vs_eager']:.2f}x; with explicit "
            f"attention products instead of SDPA {r.get('engine_graphs_explicit_tok_s', float('nan')):.0f}); "
            f"generate+static, eager {r['generate_static_tok_s']:.0f} (engine {r['engine_vs_generate']:.2f}x); "
            f"bandwidth limit {r['bandwidth_bound_tok_s']:.0f} ({100 * r['engine_vs_bound']:.0f}%) |"
        )
    for r in report.get("agreement", []):
        lines.append(
            f"| {r['model']}-shaped, float32: engine rows ({r['graphs_captured']} CUDA graph(s)) against a plain "
            f"forward, {r['streams']} streams of {'/'.join(map(str, r['prompt_tokens']))}-token prompts, "
            f"{r['tokens']} steps (a greedy token; every fourth, a piece of three) | "
            f"{r['agreeing_streams']}/{r['streams']} streams agree on every token; "
            f"largest logit difference {r['largest_logit_diff']:.1e} |"
        )
    for r in report.get("server", []):
        interval = r.get("switch_interval_s")
        switch = "" if interval is None else f"; thread switch interval {interval * 1e3:g} ms"
        lines.append(
            f"| worker server (`python -m model_worker`, gRPC) on {r['served_on']}, {report['server_shape']}-shaped "
            f"(vocabulary {r['vocab']}), {r['batch']} session(s) drawing {r['tokens']} greedy tokens at once | "
            f"{r['server_tok_s']:.0f} tok/s, {r['server_vs_engine']:.2f}x the engine in process ("
            f"{r['engine_tok_s']:.0f} tok/s at {r['context']} tokens); {r['passes']:.0f} passes of "
            f"{r['mean_batch']:.1f} sessions, {r['in_passes_share']:.0%} of the time in them, host "
            f"{r['host_us_per_token']:.0f} us per token; {r['sessions_equal_to_generate']}/{r['batch']} sessions "
            f"equal to `generate`{switch} |"
        )
        lines.append(
            "| the same: ms per pass by phase, server / engine in process (model_worker/pass_clock.py) | "
            + ", ".join(
                f"{p} {r['server_phase_ms'].get(p, 0.0):.2f} / {r['engine_phase_ms'].get(p, 0.0):.2f}" for p in PHASES
            )
            + " |"
        )
    for r in report.get("decode_ratio", []):
        lines.append(
            f"| {report['first']}, decode step of {r['sessions']} sessions at {r['context']} tokens: engine (ragged) "
            f"/ StaticCache forward (issue 19: <= 1.15x) | {r['ratio']:.2f}x ({r['engine_ms']:.2f} vs "
            f"{r['static_ms']:.2f} ms) |"
        )
    for r in report.get("gac", []):
        lines.append(f"| GaC of both on one GPU, batch {r['batch']}: step / sum of the two alone | {r['ratio']:.2f}x |")
    if "me" in report:
        me = report["me"]
        lines.append(
            f"| ME / GaC tokens/s at batch 32 | {me['ratio']:.2f}x ({me['me_tok_s']:.0f} vs {me['gac_tok_s']:.0f}) |"
        )
    for r in report.get("burst", []):
        stretch = f", --decode-stretch {r['decode_stretch']:g}"
        lines.append(
            f"| {report['first']}, {report['burst_streams']} streams of {r['prompt_tokens']}-token prompts arriving "
            f"together{stretch}: median gap over the first 12 tokens / bare decode forward (target 1.3x); after them "
            f"(target 1.15x) | {r['burst_ratio']:.2f}x ({r['burst_gap_ms']:.1f} vs {r['bare_forward_ms']:.1f} ms); "
            f"{r['steady_ratio']:.2f}x |"
        )
    for r in report.get("generate_compiled", []):
        same = [m for m in report.get("members", []) if (m["model"], m["batch"]) == (r["model"], r["batch"])]
        versus = (
            f" (engine static form {same[0]['engine_graphs_tok_s'] / r['generate_compiled_tok_s']:.2f}x)"
            if same
            else ""
        )
        lines.append(
            f"| {r['model']}, generate+static compiled (torch.compile, CUDA graphs), batch {r['batch']} | "
            f"{r['generate_compiled_tok_s']:.0f} tok/s{versus} |"
        )
    for section, error in report.get("errors", {}).items():
        lines.append(f"| {section} | failed: {error.strip().splitlines()[-1][:200]} |")
    for section in report.get("skipped", []):
        lines.append(f"| {section} | skipped: the time budget was spent |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (the default without CUDA)")
    parser.add_argument("--json", type=Path, default=Path("bench-gpu.json"))
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="sections that would start after this many seconds are skipped (the compiled-generate one needs "
        "150 s left); the report is written after every section, so a run stopped early keeps what it measured",
    )
    parser.add_argument("--only", nargs="+", metavar="SECTION", help="run only these sections (by their JSON key)")
    parser.add_argument(
        "--server-profile",
        action="store_true",
        help="the server section samples its worker with py-spy (which must be installed) over extra rounds; "
        "the stacks go to worker-profile.txt beside --json",
    )
    parser.add_argument(
        "--server-switch-intervals",
        nargs="+",
        type=lambda v: None if v == "default" else float(v),
        default=[None],
        metavar="SECONDS",
        help="the server section starts a worker per value, with Python's thread switch interval set to it "
        "(`default`: left as it is, 5 ms)",
    )
    parser.add_argument(
        "--table-from",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="run nothing: print the table of these reports' sections together (a later report's section "
        "replaces an earlier one's)",
    )
    args = parser.parse_args(argv)
    if args.table_from:
        merged: dict[str, Any] = {}
        for path in args.table_from:
            report = json.loads(path.read_text())
            merged.update({k: v for k, v in report.items() if k not in ("errors", "skipped")})
        print(markdown({**merged, "errors": {}, "skipped": []}))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("model_worker").setLevel(logging.INFO)  # says which CUDA graphs were captured, or why not
    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    configs = {"llama-3.1-8b": LLAMA_3_1_8B, "qwen2.5-7b": QWEN2_5_7B}
    if tiny:
        configs = {n: {**c, **TINY} for n, c in configs.items()}
    rounds, context, me_tokens = (2, 32, 8) if tiny else (10, 512, 128)
    burst_lengths, streams = ((16, 48), 4) if tiny else ((64, 1536), 16)
    decode_contexts = (16, 48) if tiny else (64, 512, 1536)
    started = time.perf_counter()
    built: dict[str, Any] = {}

    def models() -> dict[str, Any]:
        """The members, built when a section first needs them (`--only server` or `agreement` never does)."""
        if not built:
            built.update({n: bench_engine.random_model(c, dtype, str(device)) for n, c in configs.items()})
        return built

    def first() -> Any:
        return models()[first_name]

    first_name = next(iter(configs))
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if not tiny else "cpu (tiny shapes)",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "first": first_name,
        "burst_streams": streams,
        "server_shape": "smollm2-135m",
        "errors": {},
        "skipped": [],
    }

    def members() -> list[dict[str, Any]]:
        rows = []
        for name, model in models().items():
            rows += member_figures(name, configs[name], model, device, dtype, (1, 8, 32), context, rounds)
        return rows

    small = {"smollm2-135m": bench_engine.SMOLLM2, "gemma-3-270m": bench_engine.GEMMA3}
    if tiny:
        small = {n: {**c, **TINY, "num_hidden_layers": 6} for n, c in small.items()}
        small["gemma-3-270m"].update(
            sliding_window=16,
            head_dim=16,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
        )
    agreement_lengths = (8, 40) if tiny else (24, 700)
    server_shape = {**bench_engine.SMOLLM2, **TINY} if tiny else bench_engine.SMOLLM2
    server_size = (8, 8) if tiny else (128, 64)  # (prompt words, tokens drawn after the first)
    workdir = tempfile.mkdtemp(prefix="chorus-bench-gpu-")
    sections: list[tuple[str, Any, float]] = [  # (key, what measures it, seconds it needs left to start)
        ("agreement", lambda: agreement_figures(small, device, agreement_lengths, 4, 16), 0.0),
        (
            "server",
            lambda: server_figures(
                server_shape,
                device,
                dtype,
                (1, 32),
                *server_size,
                Path(workdir),
                tuple(args.server_switch_intervals),
                args.json.with_name("worker-profile.txt") if args.server_profile else None,
            ),
            0.0,
        ),
        ("members", members, 0.0),
        (
            "burst",
            lambda: [
                *(bench_engine.engine_burst(first(), device, n, streams) for n in burst_lengths),
                bench_engine.engine_burst(first(), device, burst_lengths[-1], streams, decode_stretch=0.0),
            ],
            0.0,
        ),
        ("decode_ratio", lambda: bench_engine.decode_step_ratio(first(), decode_contexts, 16, rounds, device), 0.0),
        ("gac", lambda: gac_figures(models(), configs, device, context, rounds), 0.0),
        ("me", lambda: me_figure(models(), device, context, me_tokens), 0.0),
        (
            "generate_compiled",
            lambda: compiled_generate_figures(first_name, first(), device, (1, 32), context, 2, 64 if not tiny else 8),
            0.0 if tiny else 150.0,
        ),
    ]
    unknown = set(args.only or ()) - {key for key, _, _ in sections}
    if unknown:
        parser.error(f"--only: no section {', '.join(sorted(unknown))}")
    sections = [s for s in sections if args.only is None or s[0] in args.only]
    for key, measure, needs in sections:
        elapsed = time.perf_counter() - started
        if elapsed + needs > args.budget_s:
            report["skipped"].append(key)
            print(f"[{elapsed:5.0f} s] {key}: skipped (budget)", flush=True)
        else:
            print(f"[{elapsed:5.0f} s] {key} ...", flush=True)
            try:
                report[key] = measure()
            except Exception:  # one failing figure must not lose the others
                report["errors"][key] = traceback.format_exc()
                print(report["errors"][key], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        report["table"] = markdown(report)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nChorus GPU bench, {report['device']}, {report['dtype']}, {report['elapsed_s']:.0f} s\n")
    print(report["table"])
    print(f"\nwrote {args.json}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
