"""scripts/bench_gpu.py runs end to end with tiny shapes on the CPU (the GPU run uses the same code)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.py"


def test_the_gpu_bench_runs_with_tiny_shapes_on_the_cpu(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("chorus_bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "bench-gpu.json"
    assert module.main(["--tiny", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    members = report["members"]
    assert {(r["model"], r["batch"]) for r in members} == {
        (m, b) for m in ("llama-3.1-8b", "qwen2.5-7b") for b in (1, 8, 32)
    }
    for r in members:  # generate's per-token time is a difference of two timings: noisy with tiny shapes
        assert (
            r["engine_tok_s"] > 0
            and r["engine_graphs_tok_s"] > 0
            and math.isfinite(r["generate_static_tok_s"])
            and r["bandwidth_bound_tok_s"] > 0
        )
    assert [r["batch"] for r in report["gac"]] == [1, 32] and all(r["ratio"] > 0 for r in report["gac"])
    assert report["me"]["me_tok_s"] > 0 and report["me"]["gac_tok_s"] > 0
    assert [r["prompt_tokens"] for r in report["burst"]] == [16, 48]
    assert all(r["burst_gap_ms"] > 0 and r["steady_gap_ms"] > 0 and r["bare_forward_ms"] > 0 for r in report["burst"])
    assert "ME / GaC" in report["table"] and "arriving together" in report["table"]
    assert report["device"].startswith("cpu")
