"""The worker engine's own figures, measured in-process and side by side (used by bench.py and bench_gpu.py).

- decode_step_ratio: one decode step of S sessions at context L through the engine (slot storage written
  in place, a view of the slots for attention, masks per session length) against transformers' forward
  with a StaticCache written in place, same model, same shapes, same thread; interleaved, medians.
- conditioning_cpu: the worker's per-step CPU outside the forward pass (committing the piece, re-tokenizing
  the open tail, the plan) at 100 and at 2,000 tokens of text, for text the model wrote itself and for
  text written by another tokenizer (re-tokenized canonically).
Models are built from configs with random weights (the weights do not change the cost).
"""

from __future__ import annotations

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
    """S sessions of L cached tokens in an Engine's slots (random keys and values), one decode step each."""

    def __init__(self, model: Any, sessions: int, context: int, device: torch.device) -> None:
        from model_worker.engine import Engine, Feed, Slice
        from model_worker.kv_cache import SlotStorage
        from model_worker.kv_state import KVState

        self.device = device
        storage = SlotStorage(sessions, context + 1, device)
        self.engine = Engine(model, device, storage, "bench")
        self.engine.warm_up()  # allocates every layer's storage
        with torch.inference_mode():
            for keys, values in zip(storage.keys, storage.values, strict=True):
                assert keys is not None and values is not None
                keys.normal_()
                values.normal_()
        self.context = context
        self.feeds = [Feed(KVState(s, [0] * context), [1], {context}, None, 0) for s in range(sessions)]  # type: ignore[arg-type]
        self._slice = Slice

    def step(self, tokens: int = 1) -> float:
        """One pass feeding `tokens` tokens to every session (1 = a decode; more = an ME catch-up), written
        at the same cells each time, keeping the last output row."""
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
