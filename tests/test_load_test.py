"""scripts/load_test.py's memory check tells allocator pools filling (growth that levels off) from a leak
(the same growth in every phase)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "load_test.py"


@pytest.fixture(scope="module")
def load_test() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chorus_load_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


def test_pools_that_fill_and_level_off_pass(load_test: ModuleType) -> None:
    # The warm-up, then 8 phases: +90% while pools fill (more than the 23% the old check refused), then flat.
    floors = [179.0, 290.0, 330.0, 338.0, 340.0, 340.5, 339.8, 340.2, 340.6]
    assert load_test.later_half_growth_pct(floors) <= 3.0


def test_a_leak_fails_however_small_the_pools(load_test: ModuleType) -> None:
    # 8 MB more in every phase: 32 MB over the later half, from 300 MB.
    floors = [268.0 + 8 * i for i in range(9)]
    assert load_test.later_half_growth_pct(floors) > 3.0


def test_the_later_half_starts_at_the_middle_phase(load_test: ModuleType) -> None:
    # 4 phases: from phase 2 to phase 4, whatever the warm-up and phase 1 did.
    assert load_test.later_half_growth_pct([1.0, 50.0, 100.0, 100.0, 110.0]) == 10.0


def test_long_prompts_are_distinct_and_about_as_long_as_asked(load_test: ModuleType) -> None:
    """--prompt-tokens N: prompts no other request shares (so the prefix caches fill), of about N tokens."""
    import random

    rng = random.Random(0)
    prompts = [load_test.prompt_of(rng, 300) for _ in range(50)]
    assert len(set(prompts)) == 50
    # Six-digit numbers, a token per digit and one per space for the real pair's tokenizers (298 and 299 tokens
    # for these prompts): 300 // 7 of them.
    assert all(p.startswith("Add up: ") and p.endswith(" =") for p in prompts)
    assert all([len(n) for n in p.split()[2:-1]] == [6] * 42 for p in prompts)
    assert load_test.prompt_of(rng, 0).endswith("=") and "+" in load_test.prompt_of(rng, 0)


def test_the_baseline_is_the_model_in_transformers_alone(load_test: ModuleType, tmp_path: Path) -> None:
    """--baseline: each model's resident memory in a fresh transformers process, over the size of its weights;
    the ratio divides the worker's highest floor by it."""
    from coordinator.config import ModelSpec
    from tests.tiny_models import random_gemma3

    model = random_gemma3(tmp_path / "gemma3")
    weights_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    spec = ModelSpec(name="tiny", path=str(model))
    report = {"rss_mb_floor_by_phase": {"tiny": [150.0, 400.0, 390.0]}}
    got = load_test.with_baseline(report, [spec], 4)
    alone = got["rss_mb_transformers_alone"]["tiny"]
    assert alone > 100 + weights_mb  # torch and transformers imported, the weights loaded
    assert got["worker_floor_over_transformers_alone"] == {"tiny": round(400.0 / alone, 3)}
    assert got["rss_mb_floor_by_phase"] == report["rss_mb_floor_by_phase"]
