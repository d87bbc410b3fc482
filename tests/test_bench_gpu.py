"""scripts/bench_gpu.py runs end to end with tiny shapes on the CPU (the GPU run uses the same code)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("chorus_bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_gpu_bench_runs_with_tiny_shapes_on_the_cpu(tmp_path: Path) -> None:
    module = _load()
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
    assert [(r["prompt_tokens"], r["decode_stretch"]) for r in report["burst"]] == [(16, 1.5), (48, 1.5), (48, 0.0)]
    assert all(r["burst_gap_ms"] > 0 and r["steady_gap_ms"] > 0 and r["bare_forward_ms"] > 0 for r in report["burst"])
    assert "ME / GaC" in report["table"] and "arriving together" in report["table"]
    assert report["device"].startswith("cpu")
    assert report["errors"] == {} and report["skipped"] == []
    assert all(r["graphs_captured"] == 0 for r in members)  # CUDA graphs exist only on CUDA
    assert [r["context"] for r in report["decode_ratio"]] == [16, 48]
    assert all(r["engine_ms"] > 0 and r["static_ms"] > 0 for r in report["decode_ratio"])
    assert [r["model"] for r in report["agreement"]] == ["smollm2-135m", "gemma-3-270m"]
    for r in report["agreement"]:  # the engine's static decode form against a plain forward, past the window
        assert r["agreeing_streams"] == r["streams"] == 8 and r["largest_logit_diff"] < 1e-4
    # The worker server itself (a subprocess, over gRPC), greedy: every session writes what generate writes.
    assert [r["batch"] for r in report["server"]] == [1, 32]
    for r in report["server"]:
        assert r["served_on"] == "cpu" and r["server_tok_s"] > 0 and r["engine_tok_s"] > 0
        assert r["sessions_equal_to_generate"] == r["batch"]
        # Read from the worker's own metrics: every drawn token rode in one of the passes counted (a pass per
        # token at least), and some host time lies around them.
        assert r["passes"] >= r["tokens"] and r["mean_batch"] * r["passes"] == pytest.approx(r["batch"] * r["tokens"])
        assert 0 < r["in_passes_share"] < 1 and r["host_us_per_token"] > 0
        # Each pass's phases (model_worker/pass_clock.py), the server's and the engine's in process; the
        # device's own ones exist on CUDA only; no CUDA graph on a CPU.
        assert set(r["server_phase_ms"]) == {"dispatch", "prepare", "forward", "rows", "return"}
        assert set(r["engine_phase_ms"]) == {"prepare", "forward", "rows"}
        assert all(ms > 0 for ms in (*r["server_phase_ms"].values(), *r["engine_phase_ms"].values()))
        assert r["captures_in_window"] == 0
    assert "worker server" in report["table"]
    assert [r["batch"] for r in report["generate_compiled"]] == [1, 32]
    assert all(r["generate_compiled_tok_s"] > 0 for r in report["generate_compiled"])


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path: Path, monkeypatch: Any) -> None:
    module = _load()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no graph for you")

    monkeypatch.setattr(module, "gac_figures", broken)
    out = tmp_path / "bench-gpu.json"
    assert module.main(["--tiny", "--json", str(out), "--budget-s", "1000"]) == 1
    report = json.loads(out.read_text())
    assert list(report["errors"]) == ["gac"] and "no graph for you" in report["errors"]["gac"]
    assert "me" in report and "burst" in report
    assert "| gac | failed: RuntimeError: no graph for you |" in report["table"]


def test_sections_past_the_budget_are_skipped_and_said_so(tmp_path: Path) -> None:
    module = _load()
    out = tmp_path / "bench-gpu.json"
    assert module.main(["--tiny", "--json", str(out), "--budget-s", "0"]) == 0
    report = json.loads(out.read_text())
    sections = ["agreement", "server", "members", "burst", "decode_ratio", "gac", "me", "generate_compiled"]
    assert report["skipped"] == sections
    assert "skipped: the time budget was spent" in report["table"]


def test_a_table_is_printed_from_several_reports(tmp_path: Path, capsys: Any) -> None:
    """`--table-from`: sections of several runs in one table, a later report's section replacing an earlier's."""
    module = _load()
    base = {"device": "NVIDIA H200", "first": "llama-3.1-8b", "errors": {}, "skipped": []}
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({**base, "me": {"ratio": 1.0, "me_tok_s": 10, "gac_tok_s": 10}, "skipped": ["gac"]}))
    new.write_text(
        json.dumps({**base, "me": {"ratio": 2.0, "me_tok_s": 20, "gac_tok_s": 10}, "gac": [{"batch": 1, "ratio": 1.5}]})
    )
    assert module.main(["--table-from", str(old), str(new)]) == 0
    table = capsys.readouterr().out
    assert "| ME / GaC tokens/s at batch 32 | 2.00x (20 vs 10) |" in table and "1.00x" not in table
    assert "batch 1: step / sum of the two alone | 1.50x |" in table and "skipped" not in table
