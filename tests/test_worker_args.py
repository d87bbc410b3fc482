"""One definition of a worker's settings (chorus_common.worker_args.WorkerArgs): the worker's command
line, the local cluster's spawn_worker and the Helm chart's worker flags all agree with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chorus_common.worker_args import WorkerArgs
from chorus_local.cluster import worker_args
from coordinator.config import LOADING_KEYS, ModelSpec
from tests.cluster_helpers import ROOT
from tests.helm import CHART, render

VALUES = sorted((CHART / "ci").glob("*.yaml")) + sorted((ROOT / "deploy" / "helm" / "examples").glob("*.yaml"))
# Worker flags the chart never renders, and why.
NOT_IN_CHART = {
    "--port-file": "a local supervisor (chorus up) reads the bound port from it; a pod's port is fixed",
}


def _non_defaults() -> WorkerArgs:
    return WorkerArgs(
        model="/m/model.gguf",
        name="m",
        host="0.0.0.0",
        port=7000,
        device="cuda:1",
        dtype="bfloat16",
        max_memory={"0": "20GiB", "cpu": "64GiB"},
        quantization="8bit",
        max_sessions=8,
        max_model_len=4096,
        kv_budget_mib=1024.5,
        kv_wait=2.5,
        block_size=32,
        prefix_caching=False,
        max_batched_tokens=1024,
        prefill_chunk=128,
        decode_stretch=1.7,
        cuda_graphs=False,
        session_ttl=60.0,
        tls_cert=Path("/t/c.crt"),
        tls_key=Path("/t/c.key"),
        tls_ca=Path("/t/ca.crt"),
        metrics_port=9000,
        grace=5.0,
        port_file=Path("/p"),
    )


def test_the_command_line_gives_back_every_setting() -> None:
    args = _non_defaults()
    assert all(getattr(args, f.name) != f.default for f in dataclasses.fields(args) if f.name != "model")
    assert WorkerArgs.parse(args.to_argv()) == args
    assert WorkerArgs.parse(["--model", "x"]).to_argv() == ["--model", "x"]  # defaults are left out


def test_bad_settings_are_refused_by_the_command_line() -> None:
    with pytest.raises(SystemExit):
        WorkerArgs.parse(["--model", "x", "--quantization", "2bit"])
    with pytest.raises(SystemExit, match="--tls-cert and --tls-key go together"):
        WorkerArgs.parse(["--model", "x", "--tls-cert", "c.crt"])
    # A CA to check clients by, without TLS, would serve plaintext to anyone: refused, not dropped.
    with pytest.raises(SystemExit, match="--tls-ca needs --tls-cert and --tls-key"):
        WorkerArgs.parse(["--model", "x", "--tls-ca", "ca.crt"])
    with pytest.raises(SystemExit, match=r"--decode-stretch: 0 \(off\) or more than 1, got 0.9"):
        WorkerArgs.parse(["--model", "x", "--decode-stretch", "0.9"])


def test_spawn_worker_passes_a_models_config_entry_and_options_over_it() -> None:
    spec = ModelSpec(
        name="m",
        path="/m",
        device="cuda:0",
        dtype="float16",
        quantization="4bit",
        max_memory={0: "20GiB"},
        max_model_len=2048,
    )
    args = worker_args(spec, port=7000, kv_wait=1.0)
    assert WorkerArgs.parse(args.to_argv()) == args
    assert (args.model, args.name, args.device, args.dtype, args.quantization) == (
        "/m",
        "m",
        "cuda:0",
        "float16",
        "4bit",
    )
    assert (args.max_memory, args.max_model_len, args.port, args.kv_wait) == ({"0": "20GiB"}, 2048, 7000, 1.0)
    with pytest.raises(TypeError):
        worker_args(spec, kv_wiat=1.0)  # a misspelt option fails, it is not dropped


def test_every_worker_setting_a_models_config_entry_holds_reaches_the_worker() -> None:
    """A ModelSpec field named like a WorkerArgs field is passed on (path is --model)."""
    shared = set(ModelSpec.model_fields) & {f.name for f in dataclasses.fields(WorkerArgs)}
    assert shared >= {"name", "device", "dtype", "quantization", "max_memory", "max_model_len", "kv_budget_mib"}
    # The config refuses them where `chorus up` starts no worker (they would do nothing): every one of them.
    assert set(LOADING_KEYS) == shared - {"name"}
    spec = ModelSpec(
        name="m",
        path="/m",
        device="cuda:0",
        dtype="float16",
        quantization="4bit",
        max_memory={0: "20GiB"},
        max_model_len=2048,
        kv_budget_mib=512.0,
    )
    args = worker_args(spec)
    for name in shared:
        value = getattr(spec, name)
        assert value != getattr(WorkerArgs, name), f"set {name} to a non-default in this test"
        expected = {str(k): v for k, v in value.items()} if name == "max_memory" else value
        assert getattr(args, name) == expected, name
    assert args.model == spec.path


def _worker_args_in_chart(helm: str, values: Path) -> list[list[str]]:
    return [
        d["spec"]["template"]["spec"]["containers"][0]["args"]
        for d in render(helm, "-f", str(values))
        if d["kind"] == "Deployment" and "chorus.dev/model" in d["metadata"]["labels"]
    ]


def test_the_charts_worker_flags_are_the_workers_own(helm: str) -> None:
    """Every flag the chart renders parses as a WorkerArgs flag, and every WorkerArgs flag is rendered
    by some values file or named in NOT_IN_CHART with a reason."""
    rendered: set[str] = set()
    for values in VALUES:
        for args in _worker_args_in_chart(helm, values):
            args = [a for a in args if not a.startswith("$(")]  # environment expansions by the kubelet
            WorkerArgs.parse(args)
            rendered |= {a for a in args if a.startswith("--")}
    flags = {WorkerArgs.flag(f.name) for f in dataclasses.fields(WorkerArgs)}
    assert rendered <= flags
    assert flags - rendered == set(NOT_IN_CHART)
