"""The worker engine's own figures, measured in-process and side by side (used by bench.py and bench_gpu.py).

- decode_step_ratio: one decode step of S sessions at context L through the engine (slot storage written
  in place, a view of the slots for attention, masks per session length) against transformers' forward
  with a StaticCache written in place, same model, same shapes, same thread; interleaved, medians.
- conditioning_cpu: the worker's per-step CPU outside the forward pass (committing the piece, re-tokenizing
  the open tail, the plan) at 100 and at 2,000 tokens of text, for text the model wrote itself and for
  text written by another tokenizer (re-tokenized canonically).
- engine_burst: S streams of random L-token prompts arriving together at the engine (scheduler, paged KV,
  model runner: no tokenizer, so it runs on models of real shapes with random weights, as on the GPU):
  the median gap between tokens over their first 12 and over the rest, against one bare decode forward.
- few_rows_ratio: a decode pass of 2, 3, 4 and 8 sessions through the engine with the output layer that
  computes a few rows as weight @ rows.T (model_worker/vocab_projection.py) against the plain nn.Linear,
  interleaved, medians.
Models are built from configs with random weights (the weights do not change the cost).
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import torch

# SmolLM2-135M's shape (Llama: 30 layers, hidden 576, 9 heads, 3 KV heads, 49,152 tokens).
SMOLLM2 = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}

# Gemma 3 270M's shape (18 layers, 5 of 6 sliding over 512 positions, hidden 640, 262,144 tokens).
GEMMA3 = {
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def random_model(config: dict[str, Any], dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineDecode:
    """S sessions of L cached tokens in the engine's paged KV cache (random keys and values), one decode
    step each, through the engine's model runner (ragged form, or the static decode form)."""

    def __init__(self, model: Any, sessions: int, context: int, device: torch.device, static: bool = False) -> None:
        from model_worker.engine import Engine
        from model_worker.kv_layout import KVLayout
        from model_worker.kv_manager import KVManager, SessionKV
        from model_worker.scheduler import Feed, Slice

        self.device = device
        layout = KVLayout.of(model.config, next(model.parameters()).dtype)
        kv = KVManager(layout, 0, sessions, context + 1, 16, device, prefix_caching=False)
        self.engine = Engine(model, device, kv, "bench", cuda_graphs=static and device.type == "cuda")
        self.engine.runner.static.enabled = static
        self.engine.warm_up()
        with torch.inference_mode():
            for store in (*kv.keys.values(), *kv.values.values()):
                store.normal_()
        self.context = context
        self.sessions = []
        for _ in range(sessions):
            session = SessionKV(ids=[0] * context)
            kv.reserve(session, context + 1)
            self.sessions.append(session)
        self.feeds = [Feed(s, [1], {context}, None, 0) for s in self.sessions]  # type: ignore[arg-type]
        self._slice = Slice

    def step(self, tokens: int = 1) -> float:
        """One pass feeding `tokens` tokens to every session (1 = a decode; more = an ME catch-up), written
        at the same positions each time, keeping the last output row."""
        start = self.context - tokens + 1
        slices = [self._slice(f, [1] * tokens, start, [self.context]) for f in self.feeds]
        started = time.perf_counter()
        self.engine._run(slices)
        _sync(self.device)
        return time.perf_counter() - started


class StaticDecode:
    """The same S sessions in transformers' StaticCache (random keys and values), one decode step each."""

    def __init__(self, model: Any, sessions: int, context: int, device: torch.device) -> None:
        from transformers import StaticCache

        self.model, self.context, self.device = model, context, device
        self.cache = StaticCache(config=model.config, max_cache_len=context + 1)
        with torch.inference_mode():  # allocate every layer with one token, then fill
            model(input_ids=torch.zeros(sessions, 1, dtype=torch.long, device=device), cache=self.cache, use_cache=True)
            for layer in self.cache.layers:
                layer.keys.normal_()
                layer.values.normal_()
        self.input_ids = torch.ones(sessions, 1, dtype=torch.long, device=device)
        self.position_ids = torch.full((sessions, 1), context, dtype=torch.long, device=device)

    @torch.inference_mode()
    def step(self) -> float:
        for layer in self.cache.layers:  # the same cells each time
            layer.cumulative_length.fill_(self.context)
        started = time.perf_counter()
        self.model(
            input_ids=self.input_ids, position_ids=self.position_ids, cache=self.cache, use_cache=True, logits_to_keep=1
        )
        _sync(self.device)
        return time.perf_counter() - started


def decode_step_ratio(
    model: Any,
    contexts: tuple[int, ...] = (64, 512, 1536),
    sessions: int = 16,
    rounds: int = 10,
    device: torch.device | None = None,
) -> list[dict[str, float]]:
    """Per context: median engine step, median StaticCache step (ms) and their ratio."""
    device = device or next(model.parameters()).device
    out = []
    for context in contexts:
        engine, static = EngineDecode(model, sessions, context, device), StaticDecode(model, sessions, context, device)
        engine.step(), static.step()  # warm-up
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(engine.step())
            theirs.append(static.step())
        e, s = statistics.median(ours), statistics.median(theirs)
        out.append(
            {"context": context, "sessions": sessions, "engine_ms": e * 1e3, "static_ms": s * 1e3, "ratio": e / s}
        )
        del engine, static
    return out


def few_rows_ratio(
    model: Any, sessions: tuple[int, ...] = (2, 3, 4, 8), context: int = 64, rounds: int = 10
) -> list[dict[str, float]]:
    """Per session count: median decode pass (ms) with the few-rows output layer and with the plain one,
    and their ratio (with / without), on the CPU."""
    from model_worker import vocab_projection

    device = next(model.parameters()).device
    out = []
    try:
        for n in sessions:
            engine = EngineDecode(model, n, context, device)
            times: dict[bool, list[float]] = {True: [], False: []}
            for r in range(rounds + 1):
                for on in (True, False) if r % 2 else (False, True):
                    vocab_projection.few_rows(model, on)
                    elapsed = engine.step()
                    if r:  # the first round warms both up
                        times[on].append(elapsed)
            with_, without = statistics.median(times[True]), statistics.median(times[False])
            out.append({"sessions": n, "few_rows_ms": with_ * 1e3, "plain_ms": without * 1e3, "ratio": with_ / without})
            del engine
    finally:
        vocab_projection.few_rows(model, True)
    return out


def conditioning_cpu(tokenizer: Any, other: Any, lengths: tuple[int, int] = (100, 2000), steps: int = 200) -> dict:
    """Median CPU microseconds per step of commit + plan, at each text length, for the model's own tokens and
    for another tokenizer's pieces (then re-tokenized canonically)."""
    from model_worker.conditioning import Conditioner
    from model_worker.token_bytes import token_byte_table

    tokens, special = token_byte_table(tokenizer, len(tokenizer))
    other_tokens, _ = token_byte_table(other, len(other))
    conditioner = Conditioner(tokenizer, tokens, special)
    text = (
        "The history of the city is long and full of events; its people built walls, bridges and "
        "temples, and wrote it all down in books that survive to this day. "
    ) * 200
    result: dict[str, dict[int, float]] = {}
    for kind, table in (("own", tokens), ("foreign", other_tokens)):
        source = tokenizer if kind == "own" else other
        pieces = [table[i] for i in source(text, add_special_tokens=False)["input_ids"]]
        result[kind] = {}
        for length in lengths:
            state = conditioner.start("Once upon a time", True)
            for piece in pieces[:length]:
                conditioner.commit(state, piece, partial=kind == "foreign")
            times = []
            for piece in pieces[length : length + steps]:
                started = time.process_time()
                conditioner.commit(state, piece, partial=kind == "foreign")
                conditioner.plan(state)
                times.append(time.process_time() - started)
            result[kind][length] = statistics.median(times) * 1e6
    return result


# ---------------------------------------------------------------------------------------------
# The engine on the real SmolLM2, in process (a Runtime: sessions, conditioning, the engine), one thread.


def _prompts(tokenizer: Any, count: int, length: int) -> list[str]:
    """`count` prompts of `length` tokens, each a different window of a long text (no shared prefix)."""
    from scripts.real_tasks import load_items

    text = " ".join(i.prompt + " " + i.answer for i in load_items(400))
    ids = tokenizer(text)["input_ids"]
    return [tokenizer.decode(ids[1 + i * 211 : 1 + i * 211 + length - 1]) for i in range(count)]


async def _greedy(runtime: Any, session: Any, tokens: int, arrivals: list[float]) -> None:
    """Greedy steps, each committing the model's top token; the time each piece arrives."""
    import numpy as np

    from model_worker.distribution import Format

    append = b""
    for _ in range(tokens):
        out = await runtime.step(session, append, Format(1, np.dtype(np.float32)))
        arrivals.append(time.perf_counter())
        part = out.parts[0]
        append = runtime.tokens[int(part.ids[0])][part.skip_bytes :] or b" "


def burst(runtime: Any, prompt_tokens: int, streams: int = 16, tokens: int = 24) -> dict[str, float]:
    """`streams` sessions whose prompts arrive together: median gap between pieces over their first 12
    tokens (the burst) and over the rest (steady state), against one bare decode forward of `streams`
    sessions at that context (a StaticCache forward of the same model, measured in the same run)."""
    import asyncio

    from chorus_common.types import Prompt

    prompts = _prompts(runtime.loaded.tokenizer, streams, prompt_tokens)

    async def run() -> tuple[float, list[list[float]]]:
        runtime.engine.start()
        started = time.perf_counter()
        sessions = await asyncio.gather(*(runtime.open(Prompt(text=p)) for p in prompts))
        arrivals: list[list[float]] = [[] for _ in sessions]
        await asyncio.gather(*(_greedy(runtime, s, tokens, a) for s, a in zip(sessions, arrivals, strict=True)))
        for s in sessions:
            runtime.close(s)
        await runtime.engine.stop()
        return started, arrivals

    started, arrivals = asyncio.run(run())
    firsts = [times[0] - started for times in arrivals]
    return {
        **_gaps(arrivals, runtime.loaded.model, prompt_tokens, runtime.loaded.device),
        "ttft_p50_s": statistics.median(firsts),
        "ttft_max_s": max(firsts),
        "last_token_max_s": max(times[-1] for times in arrivals) - started,
    }


def draft_host_time(runtime: Any, sessions: int = 32, tokens: int = 16, prompt_tokens: int = 64) -> dict[str, float]:
    """`sessions` sessions of distinct prompts drawing `tokens` greedy tokens each at once, in Draft calls (as
    SAFE's drafter, and a model alone, draw on the worker): the worker's host time per drawn token, the wall
    time not spent in forward passes (each token's distribution, its draw, the conditioner's bookkeeping, the
    event loop), during which the other sessions of the next pass wait; and the passes run (`tokens` when
    every pass carries every session)."""
    import asyncio

    from chorus_common.types import Prompt, SamplingParams

    engine = runtime.engine
    in_passes: list[float] = []
    run_pass = engine._run

    def timed(slices: Any) -> Any:
        started = time.perf_counter()
        try:
            return run_pass(slices)
        finally:
            in_passes.append(time.perf_counter() - started)

    engine._run = timed
    prompts = _prompts(runtime.loaded.tokenizer, sessions, prompt_tokens)

    async def run() -> tuple[float, int]:
        engine.start()
        opened = [await runtime.open(Prompt(text=p)) for p in prompts]
        greedy = SamplingParams()
        await asyncio.gather(*(runtime.draft(s, b"", 0, 2, greedy, 0) for s in opened))  # prefills, first decode
        in_passes.clear()
        started = time.perf_counter()
        drafts = await asyncio.gather(*(runtime.draft(s, b"", 0, tokens, greedy, 0) for s in opened))
        wall = time.perf_counter() - started
        for s in opened:
            runtime.close(s)
        await engine.stop()
        return wall, sum(len(d.pieces) for d in drafts)  # fewer than sessions x tokens where one ends

    try:
        wall, drawn = asyncio.run(run())
    finally:
        del engine._run  # the instance attribute: the class's method again
    host = wall - sum(in_passes)
    return {
        "sessions": sessions,
        "tokens": tokens,
        "drawn": drawn,
        "wall_s": wall,
        "in_passes_s": sum(in_passes),
        "passes": len(in_passes),
        "host_us_per_token": host / max(1, drawn) * 1e6,
        "host_share": host / wall,
    }


def engine_burst(
    model: Any,
    device: torch.device,
    prompt_tokens: int,
    streams: int = 16,
    tokens: int = 24,
    seed: int = 0,
    decode_stretch: float | None = None,
) -> dict[str, float]:
    """burst() through the engine alone: `streams` sessions of random `prompt_tokens`-token prompts (no shared
    prefix) arrive together, then each feeds back its most likely token. The worker's defaults: token budget
    and prefill chunk, prefix caching, CUDA graphs on CUDA, and `decode_stretch` unless one is given."""
    import asyncio

    from chorus_common.worker_args import WorkerArgs
    from model_worker.engine import Engine
    from model_worker.kv_layout import KVLayout
    from model_worker.kv_manager import KVManager

    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(10, vocab, (prompt_tokens,), generator=generator).tolist() for _ in range(streams)]
    layout = KVLayout.of(model.config, next(model.parameters()).dtype)
    kv = KVManager(layout, 0, streams, prompt_tokens + tokens + 1, 16, device)
    if decode_stretch is None:
        decode_stretch = WorkerArgs.decode_stretch
    engine = Engine(model, device, kv, "bench", cuda_graphs=device.type == "cuda", decode_stretch=decode_stretch)
    engine.warm_up()

    async def stream(prompt: list[int], arrivals: list[float]) -> None:
        cache = engine.new_cache(prompt)
        assert cache is not None, "the pool holds every stream"
        new = prompt[len(cache.ids) :]
        for _ in range(tokens):
            position = len(cache.ids) + len(new) - 1
            await engine.forward(cache, new, {position})
            arrivals.append(time.perf_counter())
            new = [int(cache.rows[position].argmax())]
            cache.keep_rows(set())
        engine.release(cache)

    async def run() -> list[list[float]]:
        engine.start()
        arrivals: list[list[float]] = [[] for _ in prompts]
        await asyncio.gather(*(stream(p, a) for p, a in zip(prompts, arrivals, strict=True)))
        await engine.stop()
        return arrivals

    return {**_gaps(asyncio.run(run()), model, prompt_tokens, device), "decode_stretch": decode_stretch}


def _gaps(arrivals: list[list[float]], model: Any, prompt_tokens: int, device: torch.device) -> dict[str, float]:
    """Median gaps between a stream's tokens, over its first 12 (the burst) and the rest (steady state), against
    a bare decode forward of as many sessions at that context (a StaticCache forward, measured now)."""
    first = [b - a for times in arrivals for a, b in itertools.pairwise(times[:12])]
    steady = [b - a for times in arrivals for a, b in itertools.pairwise(times[12:])]
    static = StaticDecode(model, len(arrivals), prompt_tokens + 12, device)
    static.step()
    bare = statistics.median(static.step() for _ in range(5))
    return {
        "prompt_tokens": prompt_tokens,
        "burst_gap_ms": statistics.median(first) * 1e3,
        "steady_gap_ms": statistics.median(steady) * 1e3,
        "bare_forward_ms": bare * 1e3,
        "burst_ratio": statistics.median(first) / bare,
        "steady_ratio": statistics.median(steady) / bare,
    }


def reuse(runtime: Any, history_tokens: int = 1500) -> dict[str, float]:
    """Time to first token of a chat's second turn after a `history_tokens` history (its blocks cached from
    the first turn) against a cold conversation of the same length; interleaved, medians of 3."""
    import asyncio

    from chorus_common.types import Prompt

    histories = _prompts(runtime.loaded.tokenizer, 7, history_tokens)

    async def ttft(messages: tuple[tuple[str, str], ...]) -> float:
        started = time.perf_counter()
        session = await runtime.open(Prompt(messages=messages, apply_chat_template=True))
        arrivals: list[float] = []
        await _greedy(runtime, session, 1, arrivals)
        runtime.close(session)
        return arrivals[0] - started

    async def run() -> tuple[list[float], list[float]]:
        runtime.engine.start()
        cold, warm = [], []
        for i in range(3):
            first = (("user", histories[2 * i]),)
            await ttft(first)  # the first turn: its blocks stay cached
            second = (*first, ("assistant", "I see."), ("user", "Summarise it in one line."))
            warm.append(await ttft(second))
            cold.append(await ttft((("user", histories[2 * i + 1]), *second[1:])))
        await runtime.engine.stop()
        return cold, warm

    cold, warm = asyncio.run(run())
    return {
        "history_tokens": history_tokens,
        "cold_ttft_ms": statistics.median(cold) * 1e3,
        "warm_ttft_ms": statistics.median(warm) * 1e3,
        "speedup": statistics.median(cold) / statistics.median(warm),
    }


def capacity(runtime_for_budget: Any, sessions: int = 32, prompt_tokens: int = 200, tokens: int = 16) -> dict:
    """`sessions` concurrent sessions of `prompt_tokens`-token prompts, `tokens` greedy tokens each, on a
    worker whose KV budget holds 4 sessions of 4,096 tokens: how many failed."""
    import asyncio

    from chorus_common.types import Prompt

    runtime = runtime_for_budget
    prompts = _prompts(runtime.loaded.tokenizer, sessions, prompt_tokens)

    async def one(prompt: str) -> str | None:
        try:
            session = await runtime.open(Prompt(text=prompt))
            try:
                await _greedy(runtime, session, tokens, [])
            finally:
                runtime.close(session)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    async def run() -> list[str | None]:
        runtime.engine.start()
        out = await asyncio.gather(*(one(p) for p in prompts))
        await runtime.engine.stop()
        return out

    errors = [e for e in asyncio.run(run()) if e]
    report = runtime.engine.report()
    return {"sessions": sessions, "failed": len(errors), "errors": errors[:3], "kv_blocks": report.blocks}
