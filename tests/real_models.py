"""Shared by the real-model test files: the two models from PyPI, their workers, a reference.

SmolLM2-135M-Instruct and Gemma 3 270M (`make real-models` prepares them), served by real worker
processes with a 1,024-token context (past Gemma's 512-token window, cheap to fill).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import chorus
from chorus_local.cluster import WorkerProcess, spawn_worker
from coordinator.config import ModelSpec
from model_worker import catalog
from model_worker.token_bytes import token_byte_table
from tests.cluster_helpers import LoopThread, coordinator, make_config

SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
CONTEXT = 1024  # --max-model-len of the served workers: past Gemma's 512-token window, cheap to fill
STRATEGIES: dict[str, dict[str, Any]] = {
    "gac": {},
    "threshold": {"threshold": 0.5, "model_extras": [{"priority": "primary"}, {}]},
    "unite": {},
    "safe": {},
    "chared": {},
    "me": {"defaults": {"temperature": 0.05}},  # me only samples: near-greedy, each model keeps its argmax
}


def document() -> str:
    """About 900 tokens of real English prose: LAMBADA passages (the quality bench's data package)."""
    from scripts.real_tasks import load_items

    text = ""
    for item in load_items(40):
        text += item.prompt + " " + item.answer + "\n\n"
        if len(text) > 3300:
            return text + "To sum up,"
    raise AssertionError("not enough text")


EVERYDAY = {
    "english": "The capital of France is",
    "code": "def fibonacci(n):\n",
    "french": "Le chat est",
    "chinese": "我爱北京",
    "emoji": "Party time 🎉🎉 let's",
    "list": "1. apples\n2.",
}


@dataclass
class Real:
    name: str
    path: Path
    tokenizer: Any
    model: Any
    tokens: list[bytes]

    def generate(self, prompt: str, n: int) -> str:
        """transformers' own greedy generate, as text (exact bytes of the tokens, decoded as Chorus does)."""
        inputs = self.tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=n, do_sample=False)
        ids = out[0, inputs.input_ids.shape[1] :].tolist()
        eos = self.model.generation_config.eos_token_id
        ids = [i for i in ids if i not in (eos if isinstance(eos, list) else [eos])]
        return b"".join(self.tokens[i] for i in ids).decode("utf-8", errors="replace")

    @torch.inference_mode()
    def next_probs(self, prompt: str, after: list[int] = ()) -> torch.Tensor:  # type: ignore[assignment]
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        if after:
            ids = torch.cat([ids, torch.tensor([list(after)])], dim=1)
        return torch.softmax(self.model(ids).logits[0, -1].double(), -1)


@pytest.fixture(scope="module")
def real() -> dict[str, Real]:
    torch.set_num_threads(1)
    out = {}
    for name in (SMOL, GEMMA):
        path = catalog.prepare(name, log=False)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokens, _ = token_byte_table(tokenizer, model.get_output_embeddings().weight.shape[0])
        out[name] = Real(name, path, tokenizer, model, tokens)
    return out


@pytest.fixture(scope="module")
def workers(real: dict[str, Real]) -> Iterator[dict[str, WorkerProcess]]:
    started = {}
    try:
        for name in (SMOL, GEMMA):
            spec = ModelSpec(name=name, path=str(real[name].path), max_model_len=CONTEXT)
            started[name] = spawn_worker(spec, timeout=300, threads=1)
        yield started
    finally:
        for w in started.values():
            w.stop()


def serve(loop: LoopThread, workers: list[WorkerProcess], prompts: list[str], **options: Any) -> list[chorus.Result]:
    config = make_config(workers, **options.pop("config", {}))
    with coordinator(loop, config) as target, chorus.Client(target, timeout=600) as client:
        return [client.generate(prompt=p, **options) for p in prompts]
