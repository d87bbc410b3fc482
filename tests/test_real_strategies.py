"""Real models under every strategy: models that each alone write a text write it together (split
characters included), and prompts past Gemma's sliding window and at the context limit work (draft,
score and lookup included). See tests/real_models.py for the models.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chorus_local.cluster import WorkerProcess, spawn_worker
from coordinator.config import ModelSpec
from tests.cluster_helpers import LoopThread, prefix_hit_tokens
from tests.real_models import CONTEXT, GEMMA, SMOL, STRATEGIES, Real, document, serve

pytestmark = pytest.mark.real

# --------------------------------------------------------------------------- models that agree agree together

AGREED = ["1, 2, 3, 4, 5, 6,", "a b c d e f g h", "🙂 🙂 🙂 🙂 🙂 🙂"]


@pytest.fixture(scope="module")
def agreed_texts(loop: LoopThread, workers: dict[str, WorkerProcess]) -> list[str]:
    """What both models write alone, as far as they agree (at least 10 characters each)."""
    alone = [serve(loop, [workers[name]], AGREED, max_new_tokens=12) for name in (SMOL, GEMMA)]
    common = []
    for a, b in zip(*alone, strict=True):
        n = next(
            (k for k in range(min(len(a.text), len(b.text))) if a.text[k] != b.text[k]), min(len(a.text), len(b.text))
        )
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
    served = serve(loop, [workers[SMOL], workers[GEMMA]], AGREED, max_new_tokens=steps, config=config, **options)
    for expected, result in zip(agreed_texts, served, strict=True):
        assert result.text.startswith(expected), (strategy, result.text, expected)
        assert "\ufffd" not in result.text  # no character corrupted


# --------------------------------------------------------------------------- long prompts, full contexts


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_prompts_past_the_window_and_at_the_context_limit_work_under_every_strategy(
    loop: LoopThread, real: dict[str, Real], workers: dict[str, WorkerProcess], strategy: str
) -> None:
    text = document()
    longest = max(len(r.tokenizer(text).input_ids) for r in real.values())
    assert 512 < longest < CONTEXT - 12
    # Filled up to a few tokens short of the limit for the model whose tokenizer needs more tokens.
    words = text.split(" ")
    full = text
    while max(len(r.tokenizer(full).input_ids) for r in real.values()) < CONTEXT - 4:
        full += " " + words[len(full) % len(words)]
    config = {"strategy": strategy, **STRATEGIES[strategy]}
    options = {"temperature": 0.05, "seed": 1} if strategy == "me" else {}
    long, at_limit = serve(
        loop, [workers[SMOL], workers[GEMMA]], [text, full], max_new_tokens=8, config=config, **options
    )
    assert long.finish_reason in ("length", "stop") and long.usage.completion_tokens >= 1
    assert at_limit.finish_reason == "length" and 1 <= at_limit.usage.completion_tokens <= 8
    assert at_limit.usage.models[1].prompt_tokens > 512 or at_limit.usage.models[0].prompt_tokens > 512


# --------------------------------------------------------------------------- prefix caching changes nothing


@pytest.fixture(scope="module")
def without_prefix_cache(real: dict[str, Real]) -> Iterator[dict[str, WorkerProcess]]:
    spawned = {}
    try:
        for name in (SMOL, GEMMA):
            spec = ModelSpec(name=name, path=str(real[name].path), max_model_len=CONTEXT)
            spawned[name] = spawn_worker(spec, timeout=300, threads=1, options={"prefix_caching": False})
        yield spawned
    finally:
        for worker in spawned.values():
            worker.stop()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_prefix_caching_changes_no_output_under_any_strategy(
    loop: LoopThread,
    workers: dict[str, WorkerProcess],
    without_prefix_cache: dict[str, WorkerProcess],
    strategy: str,
) -> None:
    """Prompts sharing a document past Gemma's window: both models serve the second (and, across strategies,
    every later one) from their prefix caches (Gemma's sliding layers from the prefix's last window); the
    texts are those of workers without one."""
    text = document()
    prompts = [text + " The first word", text + " In short,"]
    config = {"strategy": strategy, **STRATEGIES[strategy]}
    options = {"temperature": 0.05, "seed": 1} if strategy == "me" else {}
    before = {name: loop.run(prefix_hit_tokens(workers[name].address)) for name in (SMOL, GEMMA)}
    cached = serve(loop, [workers[SMOL], workers[GEMMA]], prompts, max_new_tokens=8, config=config, **options)
    plain_workers = [without_prefix_cache[SMOL], without_prefix_cache[GEMMA]]
    plain = serve(loop, plain_workers, prompts, max_new_tokens=8, config=config, **options)
    assert [r.text for r in cached] == [r.text for r in plain]
    assert all(r.usage.completion_tokens >= 1 for r in cached)
    for name in (SMOL, GEMMA):  # the shared document (past Gemma's 512-position window) came from the cache
        assert loop.run(prefix_hit_tokens(workers[name].address)) - before[name] > 512, name


# --------------------------------------------------------------------------- characters split over tokens, chared


def test_chared_keeps_split_emoji_whole(loop: LoopThread, workers: dict[str, WorkerProcess]) -> None:
    """Gemma writes 🎉 as one token, SmolLM2 as three (b" \\xf0\\x9f", b"\\x8e", b"\\x89"): deciding character by
    character, the ensemble writes no broken character after emoji in the prompt."""
    config = {"strategy": "chared", **STRATEGIES["chared"]}
    (result,) = serve(
        loop, [workers[SMOL], workers[GEMMA]], ["Party time 🎉🎉 and then"], max_new_tokens=30, config=config
    )
    assert result.text.strip() and "\ufffd" not in result.text, result.text


def test_chared_writes_the_indented_code_both_models_write(loop: LoopThread, workers: dict[str, WorkerProcess]) -> None:
    """Indentation is a run of spaces each tokenizer writes as one token: decided a character at a time,
    the spaces, then the code after them, as each model alone writes it (not only spaces)."""
    prompt = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""'
    alone = [serve(loop, [workers[name]], [prompt], max_new_tokens=8)[0].text for name in (SMOL, GEMMA)]
    common = alone[0][: next((k for k, (a, b) in enumerate(zip(*alone, strict=False)) if a != b), min(map(len, alone)))]
    assert common.startswith("\n    if n"), alone  # both write the same indented line
    config = {"strategy": "chared", **STRATEGIES["chared"]}
    (result,) = serve(loop, [workers[SMOL], workers[GEMMA]], [prompt], max_new_tokens=30, config=config)
    assert result.text.startswith(common), (result.text, common)


def test_chared_writes_code_after_others_indent_and_blank_lines(
    loop: LoopThread, workers: dict[str, WorkerProcess]
) -> None:
    """CharED commits indentation and blank lines one character at a time, and SmolLM2's tokenizer spells
    a run of them at the end of a text otherwise than before a word (b"    " against b"   " + b" return",
    b"\n\n" against b"\n" + b"\n" + b"#"): each step reads both spellings, so the ensemble writes code.
    Reading only the first, it wrote 24 spaces after the docstring, and 30 line breaks after a statement."""
    prompts = {
        'def add(a, b):\n    """Add two numbers."""\n': "    return a + b\n\n",
        "for i in range(3):\n": "    print(i)\n\n",
    }
    config = {"strategy": "chared", **STRATEGIES["chared"]}
    served = serve(loop, [workers[SMOL], workers[GEMMA]], list(prompts), max_new_tokens=40, config=config)
    for start, result in zip(prompts.values(), served, strict=True):
        text = result.text
        assert text.startswith(start) and text[len(start) : len(start) + 1] != "\n" and len(text.split()) >= 4, text


# --------------------------------------------------------------------------- SAFE: drafts and lockstep

SAFE_PROMPTS = ["def fibonacci(n):\n", "Le chat est", "Party time 🎉🎉 let's"]


@pytest.mark.timeout(900)  # twelve greedy runs of 16 tokens: minutes on a loaded shared CPU
def test_safe_drafts_decide_alike_whatever_their_length_and_lockstep_decides_as_gac(
    loop: LoopThread, workers: dict[str, WorkerProcess]
) -> None:
    """Greedy SAFE with fixed drafts decides each drafted position alike whatever the draft's length: the
    drafter's token where the models agree (or inside a verifier's token), the ensemble's where they do
    not; fixed five-token and one-token drafts write the same text. Adaptive SAFE (the default) steps in
    lockstep where this pair disagrees: each position asks both models at once and, with equal weights,
    decides as GaC does, so it writes GaC's text, at GaC's forward passes per token at most."""
    pair = [workers[SMOL], workers[GEMMA]]
    served = {}
    for label, config in (
        ("adaptive", {"strategy": "safe"}),
        ("fixed 5", {"strategy": "safe", "safe": {"adaptive": False}}),
        ("fixed 1", {"strategy": "safe", "safe": {"adaptive": False, "draft_tokens": 1}}),
        ("gac", {"strategy": "gac"}),
    ):
        served[label] = serve(loop, pair, SAFE_PROMPTS, max_new_tokens=16, config=config)
    texts = {label: [r.text for r in results] for label, results in served.items()}
    assert texts["fixed 5"] == texts["fixed 1"]
    assert texts["adaptive"] == texts["gac"]
    ensembled = [r.usage.steps_ensembled for r in served["adaptive"]]
    assert all(0 < n < 16 for n in ensembled), ensembled  # the pair disagrees here and there
    for safe, gac in zip(served["adaptive"], served["gac"], strict=True):
        passes = [sum(m.forward_passes for m in r.usage.models) / r.usage.steps for r in (safe, gac)]
        assert passes[0] <= passes[1], passes
