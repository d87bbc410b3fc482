"""Smoke test of scripts/bench.py: the coordinator CPU-per-step microbenchmark runs and returns sane numbers.

Structure and positivity only: timings on a shared machine are no assertion.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chorus_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("transport", ["topk", "full"])
def test_cpu_per_step_microbench(bench: ModuleType, k: int, transport: str) -> None:
    result = bench.coordinator_cpu_per_step(k, 3000, transport, steps=10)
    assert result["k"] == k and result["vocab"] == 3000 and result["transport"] == transport
    assert result["steps"] == 10
    assert 0 < result["median_us"] <= result["p90_us"] and math.isfinite(result["p90_us"])
    # 60% of each vocabulary shared: the union holds END, the shared tokens once and each model's own.
    shared = int(2999 * 0.6)
    assert result["union_size"] == 1 + shared + k * (2999 - shared)
    assert 0 <= result["last_uid"] < result["union_size"]
    assert result["message_bytes"] > (2 * 3000 if transport == "full" else 20 * 8)


def test_figures_render(bench: ModuleType) -> None:
    figures = [
        bench.Figure("a", "ratio", 1.01, "x", "<=", 1.05),
        bench.Figure("b", "speedup", 2.0, "x", ">=", 8.0, note="why"),
        bench.Figure("c", "info", 3.5, " ms"),
        bench.Figure("d", "hook", None, note="not available"),
    ]
    assert [f.status for f in figures] == ["PASS", "MISS", "info", "SKIP"]
    text = bench.table(figures)
    assert "| ratio" in text and "PASS" in text and "- speedup: why" in text


def test_bench_safe_reports_fixed_draft_variants_against_gac() -> None:
    """bench_safe's per-prompt summary divides each variant by GaC (medians), and its report shows
    the fixed-draft and GaC-again columns only when asked for."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_safe

    def runs(ms: list[float], passes: float) -> list[dict[str, object]]:
        return [{"text": "t", "ms_per_token": m, "passes_per_token": passes, "ensembled": 3} for m in ms]

    measured = {
        "gac": runs([100, 110, 300], 2.0),  # median 110
        "safe": runs([99, 121, 1], 2.0),  # median 99
        "safe_fixed_2": runs([220, 220, 220], 3.0),
        "gac_again": runs([121, 121, 0], 2.0),  # median 121
    }
    summary = bench_safe._summary("p", measured, (2,))
    assert summary["ms_ratio"] == pytest.approx(0.9) and summary["passes_ratio"] == 1.0
    assert summary["fixed"] == {"2": {"ms_ratio": pytest.approx(2.0), "passes_ratio": 1.5}}
    assert summary["gac_again_ms_ratio"] == pytest.approx(1.1)
    report = bench_safe.report({"prompts": [summary]})
    assert "fixed 2" in report and "2.00x  1.50fp" in report and "(the noise floor): 1.10-1.10x" in report
    plain = bench_safe._summary("p", {k: measured[k] for k in ("gac", "safe")})
    assert plain["fixed"] == {} and "gac_again_ms_ratio" not in plain
    assert "fixed" not in bench_safe.report({"prompts": [plain]}) and "again" not in bench_safe.report(
        {"prompts": [plain]}
    )


def test_draft_host_time_splits_the_wall_time_at_the_passes(bench: ModuleType, tmp_path: Path) -> None:
    """The worker's host time per drawn token (bench.py's engine section) on a tiny model: every token drawn,
    the passes timed, the engine's own pass runner given back."""
    import bench_engine  # on the path once bench.py is loaded

    from model_worker.loading import load_model
    from model_worker.runtime import Runtime
    from tests.tiny_models import random_llama

    runtime = Runtime(load_model(str(random_llama(tmp_path / "llama"))))
    r = bench_engine.draft_host_time(runtime, sessions=4, tokens=3, prompt_tokens=16)
    assert r["sessions"] == 4 and r["tokens"] == 3 and r["drawn"] == 12
    assert r["passes"] >= 3  # a session late for a pass rides in the next: never fewer than the tokens
    assert 0 < r["in_passes_s"] < r["wall_s"] and r["host_us_per_token"] > 0 and 0 < r["host_share"] < 1
    assert "_run" not in vars(runtime.engine)
    assert not runtime.sessions  # every session closed
