"""`--decode-stretch`: a pass that carries decodes takes only the prompt tokens that keep it within the stretch
of a pass of every waiting session's decode (model_worker/engine.py, scheduler.PassCosts), and what it computes
does not change."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from chorus_common.types import Prompt
from model_worker.distribution import Format
from model_worker.loading import load_model
from model_worker.runtime import Runtime
from model_worker.scheduler import SHORT, PassCosts
from tests.tiny_models import random_llama

FULL = Format(top_k=0, dtype=np.dtype(np.float32))


def test_pass_costs_learn_both_parts_and_give_the_prompt_budget() -> None:
    costs = PassCosts()
    assert costs.prompt_budget(1.3, 16, 16) == 0  # the decodes' time unknown: they run alone once, to time them
    costs.observe(0.2, decodes=16, prompt_tokens=0)
    assert costs.prompt_budget(1.3, 16, 16) is None  # a prompt token's cost unknown: no cap, the chunks time it
    costs.observe(0.2 + 0.5, decodes=16, prompt_tokens=100)  # 5 ms each beside the decodes' 200
    assert costs.prompt_token_s == pytest.approx(0.005)
    assert (costs.decodes_s, costs.decodes) == (pytest.approx(0.2), 16)
    assert costs.prompt_budget(1.3, 16, 16) == 12  # 0.3 x 200 ms / 5 ms
    assert costs.prompt_budget(2.0, 16, 16) == 40
    # A pass spent mostly on decodes times them (its prompt tokens at their known cost taken off)...
    costs.observe(0.31, decodes=16, prompt_tokens=10)
    assert costs.decodes_s == pytest.approx(0.7 * 0.2 + 0.3 * 0.26)
    assert costs.prompt_token_s == pytest.approx(0.005)
    # ... and one spent mostly on prompt tokens times them (the decodes' known time taken off).
    decodes_s = costs.decodes_s
    costs.observe(decodes_s + 80 * 0.01, decodes=16, prompt_tokens=80)
    assert costs.prompt_token_s == pytest.approx(0.7 * 0.005 + 0.3 * 0.01)
    assert costs.decodes_s == decodes_s
    # Prompt tokens alone time themselves; a pass of both parts says nothing while neither is known.
    fresh = PassCosts()
    fresh.observe(1.0, decodes=4, prompt_tokens=100)
    assert (fresh.decodes_s, fresh.prompt_token_s) == (None, None)
    fresh.observe(0.5, decodes=0, prompt_tokens=100)
    assert fresh.prompt_token_s == pytest.approx(0.005)
    costs.decodes_s, costs.prompt_token_s = 0.001, 1.0
    assert costs.prompt_budget(1.1, 16, 16) == 1  # a prompt always advances


def test_the_budget_is_held_to_a_pass_of_every_waiting_sessions_decode() -> None:
    """While a burst is read, the few sessions that already write may slow to S times the pace all of them
    will write at, not S times their own: a decode more costs about a prompt token."""
    costs = PassCosts()
    costs.observe(0.09, decodes=4, prompt_tokens=0)  # 4 decodes: 90 ms
    costs.observe(0.09 + 100 * 0.005, decodes=4, prompt_tokens=100)  # 5 ms a prompt token
    assert costs.decodes_time(4) == pytest.approx(0.09)
    assert costs.decodes_time(16) == pytest.approx(0.09 + 12 * 0.005)
    assert costs.decodes_time(1) == pytest.approx(0.09 - 3 * 0.005)
    assert costs.decodes_time(0) == pytest.approx(0.07)
    # 1 session writes, 15 prompts wait: 1.3 x 150 ms, less that one decode's 75 ms, in 5 ms tokens.
    assert costs.prompt_budget(1.3, 1, 16) == int((1.3 * 0.15 - 0.075) / 0.005)
    # The more of them write, the fewer prompt tokens fit beside them; with none waiting, S x their own time.
    assert costs.prompt_budget(1.3, 8, 16) < costs.prompt_budget(1.3, 1, 16)
    assert costs.prompt_budget(1.3, 4, 4) == int(0.3 * 0.09 / 0.005)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_model(str(random_llama(tmp_path_factory.mktemp("llama"))))


class _FixedCosts(PassCosts):
    """Costs that the passes do not move: the budget is the test's to set."""

    def __init__(self, decodes_s: float, prompt_token_s: float) -> None:
        super().__init__()
        self.decodes_s, self.decodes, self.prompt_token_s = decodes_s, 1.0, prompt_token_s

    def observe(self, seconds: float, decodes: int, prompt_tokens: int) -> None:
        pass


def _decode_beside_a_prompt(
    loaded: Any, stretch: float, repeats: int = 12, budget: int = 64
) -> tuple[list[tuple[int, int]], dict]:
    """One session writes while another's prompt (`repeats` times a 9-word sentence) is read, at most `budget`
    tokens a pass: each pass's (decode tokens, prompt tokens), and the prompt's first distribution."""
    runtime = Runtime(loaded, prefill_chunk=64, max_batched_tokens=budget, decode_stretch=stretch)
    engine = runtime.engine
    # One decode 40 ms, two sessions 50 ms: stretch 1.5 leaves 75 - 40 ms, 3 prompt tokens per pass.
    engine.costs = _FixedCosts(decodes_s=0.04, prompt_token_s=0.01)
    passes: list[tuple[int, int]] = []
    run = engine._run

    def counted(slices: Any) -> Any:
        short = [len(s.tokens) for s in slices if s.feed.remaining <= SHORT]
        passes.append((sum(short), sum(len(s.tokens) for s in slices) - sum(short)))
        return run(slices)

    engine._run = counted

    async def go() -> dict:
        engine.start()
        writer = await runtime.open(Prompt(text="a"))
        await runtime.step(writer, b"", FULL)
        reader = await runtime.open(Prompt(text="the quick brown fox jumps over the lazy dog " * repeats))
        first = asyncio.ensure_future(runtime.step(reader, b"", FULL))
        for piece in (b"b", b"c", b"d", b"e", b"f", b"g"):
            await runtime.step(writer, piece, FULL)
        out = await first
        await engine.stop()
        return {p.skip_bytes: p.logprobs.copy() for p in out.parts}

    return passes, asyncio.run(go())


def test_passes_with_decodes_take_only_the_prompt_tokens_the_stretch_allows(loaded: Any) -> None:
    stretched, with_stretch = _decode_beside_a_prompt(loaded, 1.5)
    mixed = [prompt for decodes, prompt in stretched if decodes and prompt]
    assert mixed and max(mixed) <= 3
    # Without it the same passes take whole chunks (this test can tell the two apart).
    plain, without = _decode_beside_a_prompt(loaded, 0.0)
    assert max(prompt for decodes, prompt in plain if decodes) > 3
    # And the prompt's distribution is what it was, however its tokens were split over passes.
    assert with_stretch.keys() == without.keys()
    for skip, logprobs in with_stretch.items():
        np.testing.assert_allclose(logprobs, without[skip], atol=1e-5)


def test_a_prompt_that_fits_in_one_pass_is_read_whole_beside_the_decodes(loaded: Any) -> None:
    """The stretch holds the writers' pace while more waits than one pass holds; a prompt (or a burst's tail)
    that fits is read in one pass: the writers wait that pass once, not several stretched ones."""
    passes, _ = _decode_beside_a_prompt(loaded, 1.5, repeats=3, budget=256)
    mixed = [prompt for decodes, prompt in passes if decodes and prompt]
    assert mixed and mixed[0] > 3 and sum(mixed) == mixed[0]  # the whole prompt, in the first pass beside a decode


def test_the_decodes_are_timed_alone_once_when_prompts_never_leave_them_a_pass(loaded: Any) -> None:
    """A burst keeps prompt chunks in every pass, so no pass of decodes alone would time them: the engine runs
    one (the prompts wait that pass), then caps the passes by what it measured."""
    runtime = Runtime(loaded, prefill_chunk=32, max_batched_tokens=32, decode_stretch=1.5)
    engine = runtime.engine
    decodes_alone_while_prompts_waited = []
    run = engine._run

    def counted(slices: Any) -> Any:
        fed = {id(s.feed) for s in slices}
        waited = any(f.remaining > SHORT and id(f) not in fed for f in engine._waiting)
        if waited and all(s.feed.remaining <= SHORT for s in slices):
            decodes_alone_while_prompts_waited.append(len(slices))
        return run(slices)

    engine._run = counted

    async def go() -> None:
        engine.start()
        writer, reader = await asyncio.gather(
            runtime.open(Prompt(text="a")), runtime.open(Prompt(text="the quick brown fox jumps " * 12))
        )
        first = asyncio.ensure_future(runtime.step(reader, b"", FULL))
        for piece in (b"", b"b", b"c", b"d", b"e"):
            await runtime.step(writer, piece, FULL)
        await first
        await engine.stop()

    asyncio.run(go())
    assert decodes_alone_while_prompts_waited
    assert engine.costs.decodes_s is not None and engine.costs.prompt_token_s is not None
