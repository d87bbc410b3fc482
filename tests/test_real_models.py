"""Real models, the test of truth: SmolLM2-135M-Instruct and Gemma 3 270M, from PyPI (`make real-models`).

Served through real worker processes and a coordinator, as a user runs them:
- a model alone, and a model ensembled with itself, produces exactly what transformers' `generate`
  produces for it (greedy, token for token), and samples from its own distribution (chi-square);
- models that each alone write the same text write it together, under every strategy, split
  characters included (byte-level BPE and SentencePiece spell the emoji differently);
- prompts past Gemma's 512-token sliding window, and prompts at the context limit, work under every
  strategy (draft, score and lookup included);
- a GGUF file is served directly, as its converted directory is.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import chorus
from coordinator.cluster import WorkerProcess, spawn_worker
from coordinator.config import ModelSpec
from model_worker import catalog
from model_worker.token_bytes import token_byte_table
from tests.cluster_helpers import LoopThread, coordinator, make_config

pytestmark = pytest.mark.real

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


def _document() -> str:
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


def _serve(loop: LoopThread, workers: list[WorkerProcess], prompts: list[str], **options: Any) -> list[chorus.Result]:
    config = make_config(workers, **options.pop("config", {}))
    with coordinator(loop, config) as target, chorus.Client(target, timeout=600) as client:
        return [client.generate(prompt=p, **options) for p in prompts]


# --------------------------------------------------------------------------- a model alone is that model


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_a_model_served_alone_is_that_model(
    loop: LoopThread, real: dict[str, Real], workers: dict[str, WorkerProcess], name: str
) -> None:
    prompts = [*EVERYDAY.values(), _document()]
    served = _serve(loop, [workers[name]], prompts, max_new_tokens=24)
    assert served[-1].usage.models[0].prompt_tokens > 800  # the document is long (past Gemma's window)
    for prompt, result in zip(prompts, served, strict=True):
        assert result.text == real[name].generate(prompt, 24), prompt[-40:]


def test_a_model_ensembled_with_itself_is_that_model(
    loop: LoopThread, real: dict[str, Real], workers: dict[str, WorkerProcess]
) -> None:
    twin = spawn_worker(ModelSpec(name="smollm2-twin", path=str(real[SMOL].path), max_model_len=CONTEXT), threads=1)
    try:
        prompts = list(EVERYDAY.values())
        served = _serve(loop, [workers[SMOL], twin], prompts, max_new_tokens=24)
        for prompt, result in zip(prompts, served, strict=True):
            assert result.text == real[SMOL].generate(prompt, 24), prompt
            assert result.usage.steps_ensembled == result.usage.steps
    finally:
        twin.stop()


def _chi2(counts: Counter[Any], expected: dict[Any, float], n: int) -> tuple[float, int]:
    """Chi-square statistic over the bins with an expected count of at least 5 (the rest pooled)."""
    bins = {k: p for k, p in expected.items() if p * n >= 5}
    rest = 1.0 - sum(bins.values())
    stat = sum((counts[k] - n * p) ** 2 / (n * p) for k, p in bins.items())
    seen_rest = n - sum(counts[k] for k in bins)
    if rest * n > 0:
        stat += (seen_rest - n * rest) ** 2 / (n * rest)
    return stat, len(bins)


def _chi2_critical(df: int, z: float) -> float:
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_seeded_sampling_draws_two_tokens_from_the_models_own_distribution(
    loop: LoopThread, real: dict[str, Real], workers: dict[str, WorkerProcess]
) -> None:
    """The first two tokens sampled at temperature 1 (seeds 0..n-1), against the model's joint
    softmax P(t1) P(t2 | t1) from a plain forward pass: accepted at p = 0.001; the same counts against
    the distribution at temperature 0.8 are rejected, so the test can tell."""
    model, prompt, n = real[SMOL], "My favourite animal is the", 320
    config = make_config([workers[SMOL]])
    with coordinator(loop, config) as target, chorus.Client(target, timeout=600) as client:

        def draw(seed: int) -> bytes:
            return client.generate(prompt=prompt, max_new_tokens=2, temperature=1.0, seed=seed).text.encode()

        with ThreadPoolExecutor(8) as pool:
            counts = Counter(pool.map(draw, range(n)))
    first = model.next_probs(prompt)

    def joint(temperature: float) -> dict[bytes, float]:
        p1 = first ** (1 / temperature)
        p1 /= p1.sum()
        out: dict[bytes, float] = {}
        for t1 in torch.topk(p1, 12).indices.tolist():
            p2 = model.next_probs(prompt, [t1]) ** (1 / temperature)
            p2 /= p2.sum()
            for t2 in torch.topk(p2, 12).indices.tolist():
                key = (model.tokens[t1] + model.tokens[t2]).decode("utf-8", errors="replace").encode()
                out[key] = out.get(key, 0.0) + float(p1[t1] * p2[t2])
        return out

    stat, df = _chi2(counts, joint(1.0), n)
    assert df >= 5 and stat < _chi2_critical(df, 3.09), (stat, df, counts.most_common(8))
    wrong, wrong_df = _chi2(counts, joint(0.8), n)
    assert wrong > _chi2_critical(wrong_df, 3.09), (wrong, wrong_df)


# --------------------------------------------------------------------------- models that agree agree together

AGREED = ["1, 2, 3, 4, 5, 6,", "a b c d e f g h", "🙂 🙂 🙂 🙂 🙂 🙂"]


@pytest.fixture(scope="module")
def agreed_texts(loop: LoopThread, workers: dict[str, WorkerProcess]) -> list[str]:
    """What both models write alone, as far as they agree (at least 10 characters each)."""
    alone = [_serve(loop, [workers[name]], AGREED, max_new_tokens=12) for name in (SMOL, GEMMA)]
    common = []
    for a, b in zip(*alone, strict=True):
        n = next((k for k in range(min(len(a.text), len(b.text))) if a.text[k] != b.text[k]),
                 min(len(a.text), len(b.text)))  # fmt: skip
        common.append(a.text[:n])
    assert all(len(c) >= 10 for c in common), common
    return common


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_models_that_write_the_same_alone_write_it_together(
    loop: LoopThread, workers: dict[str, WorkerProcess], agreed_texts: list[str], strategy: str
) -> None:
    config = {"strategy": strategy, **STRATEGIES[strategy]}
    options = {"temperature": 0.05, "seed": 1} if strategy == "me" else {}
    steps = 30 if strategy == "chared" else 16  # chared decides a character per step
    served = _serve(loop, [workers[SMOL], workers[GEMMA]], AGREED, max_new_tokens=steps, config=config, **options)
    for expected, result in zip(agreed_texts, served, strict=True):
        assert result.text.startswith(expected), (strategy, result.text, expected)
        assert "\ufffd" not in result.text  # no character corrupted


# --------------------------------------------------------------------------- long prompts, full contexts


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_prompts_past_the_window_and_at_the_context_limit_work_under_every_strategy(
    loop: LoopThread, real: dict[str, Real], workers: dict[str, WorkerProcess], strategy: str
) -> None:
    document = _document()
    longest = max(len(r.tokenizer(document).input_ids) for r in real.values())
    assert 512 < longest < CONTEXT - 12
    # Filled up to a few tokens short of the limit for the model whose tokenizer needs more tokens.
    words = document.split(" ")
    full = document
    while max(len(r.tokenizer(full).input_ids) for r in real.values()) < CONTEXT - 4:
        full += " " + words[len(full) % len(words)]
    config = {"strategy": strategy, **STRATEGIES[strategy]}
    options = {"temperature": 0.05, "seed": 1} if strategy == "me" else {}
    long, at_limit = _serve(loop, [workers[SMOL], workers[GEMMA]], [document, full], max_new_tokens=8,
                            config=config, **options)  # fmt: skip
    assert long.finish_reason in ("length", "stop") and long.usage.completion_tokens >= 1
    assert at_limit.finish_reason == "length" and 1 <= at_limit.usage.completion_tokens <= 8
    assert at_limit.usage.models[1].prompt_tokens > 512 or at_limit.usage.models[0].prompt_tokens > 512


# --------------------------------------------------------------------------- GGUF served directly


def test_a_gguf_file_is_served_as_its_converted_directory(real: dict[str, Real]) -> None:
    from model_worker.loading import load_model

    gguf = catalog.model_dir(SMOL) / catalog.MODELS[SMOL].gguf_name
    loaded = load_model(str(gguf))
    assert loaded.name == gguf.stem
    ids = real[SMOL].tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        direct = loaded.model(ids).logits[0, -1]
        converted = real[SMOL].model(ids).logits[0, -1]
    assert torch.allclose(direct, converted, atol=1e-4)
