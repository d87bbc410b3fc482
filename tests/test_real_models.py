"""Real models, the test of truth: SmolLM2-135M-Instruct and Gemma 3 270M, from PyPI (`make real-models`).

Served through real worker processes and a coordinator, as a user runs them:
- a model alone, and a model ensembled with itself, produces exactly what transformers' `generate`
  produces for it (greedy, token for token, a 900-token document included), and samples from its own
  distribution (chi-square against its joint softmax, with power to reject a wrong one);
- a GGUF file is served directly, as its converted directory is.
Every strategy on the two together: tests/test_real_strategies.py.
"""

from __future__ import annotations

import math
import tracemalloc
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

import chorus
from chorus_local.cluster import WorkerProcess, spawn_worker
from coordinator.config import ModelSpec
from model_worker import catalog
from tests.cluster_helpers import LoopThread, coordinator, make_config
from tests.real_models import CONTEXT, EVERYDAY, GEMMA, SMOL, Real, document, serve

pytestmark = pytest.mark.real

# --------------------------------------------------------------------------- a model alone is that model


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_a_model_served_alone_is_that_model(
    loop: LoopThread, real: dict[str, Real], workers: dict[str, WorkerProcess], name: str
) -> None:
    prompts = [*EVERYDAY.values(), document()]
    served = serve(loop, [workers[name]], prompts, max_new_tokens=24)
    assert served[-1].usage.models[0].prompt_tokens > 800  # the document is long (past Gemma's window)
    for prompt, result in zip(prompts, served, strict=True):
        assert result.text == real[name].generate(prompt, 24), prompt[-40:]


def test_a_model_ensembled_with_itself_is_that_model(
    loop: LoopThread, real: dict[str, Real], workers: dict[str, WorkerProcess]
) -> None:
    twin = spawn_worker(ModelSpec(name="smollm2-twin", path=str(real[SMOL].path), max_model_len=CONTEXT), threads=1)
    try:
        prompts = list(EVERYDAY.values())
        served = serve(loop, [workers[SMOL], twin], prompts, max_new_tokens=24)
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


# --------------------------------------------------------------------------- the tokenizer's resident copies


def test_the_worker_tokenizer_drops_its_build_tables_and_tokenizes_as_before(real: dict[str, Real]) -> None:
    """Gemma's tokenizer class keeps the vocabulary and merges it built its backend from (~150 MB of a
    worker's memory); the worker drops them, and tokenizes and decodes exactly as before."""
    from transformers import AutoTokenizer

    from model_worker.loading import drop_build_tables

    tokenizer = drop_build_tables(AutoTokenizer.from_pretrained(catalog.resolve(f"catalog:{GEMMA}")))
    assert not tokenizer._vocab and not tokenizer._merges  # the copies are gone
    reference = real[GEMMA].tokenizer
    assert reference._vocab and reference._merges  # (the reference keeps them: the class still makes them)
    for text in [*EVERYDAY.values(), document(), "<start_of_turn>user\nhi<end_of_turn>\n<unused3> ▁▁ \t\n"]:
        ids = tokenizer(text)["input_ids"]
        assert ids == reference(text)["input_ids"]
        assert tokenizer.decode(ids) == reference.decode(ids)
    assert tokenizer.get_vocab() == reference.get_vocab()


def test_the_worker_vocabulary_tables_are_compact(real: dict[str, Real]) -> None:
    """The worker's tables over Gemma 3's 262,144 tokens: building the table of their bytes peaks below 64 MB of
    Python objects (parsing the backend's whole JSON for its decoder took 196 MB, whose freed arenas stayed
    resident), and the conditioner keeps below 16 MB (a dict of every token's bytes to its ids took 44 MB)."""
    from model_worker.conditioning import Conditioner
    from model_worker.token_bytes import token_byte_table

    tokenizer = real[GEMMA].tokenizer
    tracemalloc.start()
    try:
        tokens, special = token_byte_table(tokenizer, 262144)
        built, peak = tracemalloc.get_traced_memory()
        conditioner = Conditioner(tokenizer, tokens, special)
        kept = tracemalloc.get_traced_memory()[0] - built
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MB"
    assert kept < 16 * 2**20, f"{kept / 2**20:.0f} MB"
    assert conditioner.ids_of(b" the") == [tokenizer.convert_tokens_to_ids("▁the")]
