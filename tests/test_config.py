"""Tests for coordinator.config: both file formats, every error path, CPU fallback."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from chorus_common.serving import DEFAULT_MAX_CONNECTION_AGE_S
from coordinator.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    EnsembleConfig,
    ModelSpec,
    cpu_adjusted,
    cpu_computes_bf16,
    load_config,
    parse_config,
)
from coordinator.strategies import SECTIONS, STRATEGIES

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

GAC_README_EXAMPLE = """\
NORM_TYPE_API_SERVER: 'average' # 'average' or 'score'
THRESHOLD_API_SERVER: 1.0
CONFIG_API_SERVER:
- weight: '/path/or/hub-id'
  max_memory:
    0: '24GiB'
  num_gpus: 0.5
  name: 'SOLAR-10.7B-Instruct-v1.0'
  score: 100
  priority: 'supportive' # 'primary' or 'supportive'
- weight: '...'
  max_memory:
    0: '24GiB'
  num_gpus: 0.5
  name: 'openchat-3.5-0106'
  score: 100
  priority: 'supportive'
"""

NATIVE_FULL = """\
strategy: gac
weights: score
threshold: 0.5
transport: {top_k: 0, dtype: float16}
defaults:
  max_new_tokens: 64
  temperature: 0.0
  top_p: 1.0
  top_k: 0
  apply_chat_template: false
limits: {max_new_tokens: 4096, max_conversations: 64, max_prompt_bytes: 1000000}
server: {host: 127.0.0.1, port: 50051}
models:
  - name: arith-bpe
    path: models/arith-bpe
    address: null
    score: 300
    priority: supportive
    device: cuda:1
    dtype: bfloat16
    max_memory: {0: 24GiB, cpu: 64GiB}
    num_gpus: 1
  - name: remote
    path: org/remote-model
    address: 10.0.0.2:6000
    score: 100
    device: cpu
    dtype: auto
    max_memory: null
    num_gpus: null
"""


def two(**extra: Any) -> list[dict[str, Any]]:
    """Two valid native model entries; extra keys go into the second one."""
    return [{"name": "a", "path": "a"}, {"name": "b", "path": "b", **extra}]


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- good files


def test_shipped_default() -> None:
    config = load_config(CONFIGS / "default.yaml")
    assert DEFAULT_CONFIG_PATH == CONFIGS / "default.yaml"
    assert config.strategy == "gac"
    assert config.weights == "average"
    assert (config.transport.top_k, config.transport.dtype) == (0, "float32")
    assert config.defaults.max_new_tokens == 8
    assert config.model_names == ("arith-bpe", "arith-sp")
    assert [m.path for m in config.models] == [
        str(REPO / "models" / "arith-bpe"),
        str(REPO / "models" / "arith-sp"),
    ]
    assert config.primary_index is None
    assert config.weight_vector() == [0.5, 0.5]


def test_shipped_threshold() -> None:
    config = load_config(CONFIGS / "threshold.yaml")
    assert config.strategy == "threshold"
    assert config.threshold == 0.6
    assert config.primary_index == 0 and config.models[0].name == "arith-bpe"
    assert config.models[1].priority == "supportive"


def test_native_full_example(tmp_path: Path) -> None:
    (tmp_path / "models" / "arith-bpe").mkdir(parents=True)
    config = load_config(write(tmp_path, NATIVE_FULL))
    local, remote = config.models
    assert local.path == str(tmp_path / "models" / "arith-bpe")  # resolved
    assert remote.path == "org/remote-model"  # hub id kept
    assert remote.address == "10.0.0.2:6000"
    assert local.max_memory == {0: "24GiB", "cpu": "64GiB"}
    assert (local.device, local.dtype, local.num_gpus) == ("cuda:1", "bfloat16", 1)
    assert remote.loading_settings() == [] and local.loading_settings() == ["device", "dtype", "max_memory"]
    assert config.weight_vector() == [0.75, 0.25]
    assert config.server.port == 50051
    assert config.limits.max_conversations == 64


def test_minimal_native_uses_defaults() -> None:
    config = load_config({"models": [{"path": "org/some-model"}]})
    assert config.strategy == "gac"
    assert config.weights == "average"
    assert config.threshold == 0.5
    assert (config.transport.top_k, config.transport.dtype) == (0, "float16")
    assert config.defaults.max_new_tokens == 64
    assert config.defaults.temperature == 0.0
    assert config.limits.max_new_tokens == 4096
    assert (config.server.host, config.server.port) == ("127.0.0.1", 50051)
    model = config.models[0]
    assert model.name == "some-model"  # defaults to the last path component
    assert (model.priority, model.device, model.dtype) == ("supportive", "cpu", "auto")
    assert model.address is None and model.max_memory is None


def test_empty_sections_mean_defaults() -> None:
    config = load_config({"defaults": None, "server": None, "models": two()})
    assert config.defaults.max_new_tokens == 64
    assert config.server.port == 50051


def test_gac_readme_example(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GAC_README_EXAMPLE))
    assert config.strategy == "gac"  # all supportive: ensemble every step
    assert config.weights == "average"
    assert config.threshold == 1.0
    assert config.model_names == ("SOLAR-10.7B-Instruct-v1.0", "openchat-3.5-0106")
    solar = config.models[0]
    assert solar.path == "/path/or/hub-id"
    assert solar.max_memory == {0: "24GiB"}
    assert (solar.num_gpus, solar.score, solar.priority) == (0.5, 100, "supportive")
    assert config.weight_vector() == [0.5, 0.5]


@pytest.mark.parametrize(
    ("file", "strategy", "weights", "primary", "vector"),
    [
        ("gac_every_step.yaml", "gac", "average", None, [0.5, 0.5]),
        ("gac_thresholded.yaml", "threshold", "score", "arith-bpe", [0.6, 0.4]),
    ],
)
def test_shipped_gac_files(file: str, strategy: str, weights: str, primary: str | None, vector: list[float]) -> None:
    config = load_config(CONFIGS / file)
    assert config.strategy == strategy
    assert config.weights == weights
    index = config.primary_index
    assert (None if index is None else config.models[index].name) == primary
    assert config.weight_vector() == pytest.approx(vector)
    assert config.models[0].path == str(REPO / "models" / "arith-bpe")


def test_gac_primary_means_threshold() -> None:
    config = load_config(
        {
            "NORM_TYPE_API_SERVER": "score",
            "THRESHOLD_API_SERVER": 0.3,
            "CONFIG_API_SERVER": [
                {"weight": "x/a", "name": "a", "score": 1, "priority": "supportive"},
                {"weight": "x/b", "name": "b", "score": 3, "priority": "primary"},
            ],
        }
    )
    assert config.strategy == "threshold"
    assert config.threshold == 0.3
    assert config.primary_index == 1
    assert config.weight_vector() == [0.25, 0.75]


def test_gac_quantization_key_accepted() -> None:
    entry = {"weight": "org/m", "name": "m", "quantization": "none"}
    config = load_config({"CONFIG_API_SERVER": [entry]})
    assert config.models[0].quantization == "none"


@pytest.mark.parametrize(("strategy_given", "expected"), [(None, "threshold"), ("gac", "gac")])
def test_primary_implies_threshold_unless_explicit(strategy_given: str | None, expected: str) -> None:
    data: dict[str, Any] = {"models": two(priority="primary")}
    if strategy_given:
        data["strategy"] = strategy_given
    assert load_config(data).strategy == expected


def test_strategies_registry() -> None:
    from coordinator import config as config_module

    assert set(STRATEGIES) == {"gac", "threshold", "me", "unite", "safe", "chared"}
    assert config_module.STRATEGIES is STRATEGIES  # the one registry, no list of its own
    # Each strategy with settings has its section, named after it, defaulting to its Settings' defaults.
    assert set(SECTIONS) == {"me", "unite", "safe", "chared"} <= set(EnsembleConfig.model_fields)
    defaults = load_config({"models": two()})
    assert all(getattr(defaults, name) == settings() for name, settings in SECTIONS.items())
    sampling = {"defaults": {"temperature": 1.0}}  # me samples; it refuses greedy defaults
    for name in STRATEGIES:
        models = two(priority="primary")
        assert load_config({"strategy": name, "models": models, **sampling}).strategy == name


def test_a_strategy_refusing_the_default_sampling_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"defaults\.temperature.*'me'"):
        load_config({"strategy": "me", "models": two()})


# --------------------------------------------------------------------------- mistakes

ERROR_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "unknown model key",
        {"models": [{"path": "a"}, {"path": "b", "scor": 3}]},
        ["models[1].scor: unknown key (did you mean 'score'?)"],
    ),
    (
        "unknown top key",
        {"stratgy": "gac", "models": two()},
        ["stratgy: unknown key (did you mean 'strategy'?)"],
    ),
    (
        "unknown nested key",
        {"transport": {"topk": 5}, "models": two()},
        ["transport.topk: unknown key (did you mean 'top_k'?)"],
    ),
    (
        "unknown key without a close match",
        {"zzz": 1, "models": two()},
        ["zzz: unknown key (valid keys: strategy, weights"],
    ),
    ("non-string key", {1: 2, "models": two()}, ["(top level): key 1 is not a string"]),
    ("missing models", {"strategy": "gac"}, ["models: missing required key"]),
    ("empty models", {"models": []}, ["models: at least one model is required"]),
    ("models not a list", {"models": "a"}, ["models: expected a list (got 'a')"]),
    ("model not a mapping", {"models": [3]}, ["models[0]: expected a mapping (got 3)"]),
    ("missing path", {"models": [{"name": "a"}]}, ["models[0].path: missing"]),
    ("address without a name", {"models": [{"address": "h:1"}]}, ["models[0].name: missing"]),
    (
        "duplicate names",
        {"models": [{"path": "x/a"}, {"path": "y/a"}]},
        ["models[1].name: duplicate name 'a'"],
    ),
    (
        "two primaries",
        {"models": [{"path": "a", "priority": "primary"}, two(priority="primary")[1]]},
        ["models[1].priority: more than one primary model"],
    ),
    (
        "threshold without primary",
        {"strategy": "threshold", "models": two()},
        ["strategy: 'threshold' needs exactly one model with priority 'primary'"],
    ),
    (
        "unknown strategy",
        {"strategy": "mixture", "models": two()},
        ["strategy: unknown strategy 'mixture'; valid: gac, threshold, me, unite, safe, chared"],
    ),
    (
        "strategy type",
        {"strategy": 3, "models": two()},
        ["strategy: expected a string"],
    ),
    (
        "bad weights",
        {"weights": "avg", "models": two()},
        ["weights: must be 'average' or 'score' (got 'avg')"],
    ),
    (
        "negative threshold",
        {"threshold": -0.1, "models": two()},
        ["threshold: must be greater than or equal to 0"],
    ),
    ("nan threshold", {"threshold": float("nan"), "models": two()}, ["threshold:"]),
    (
        "negative score",
        {"models": two(score=-1)},
        ["models[1].score: must be greater than 0 (got -1)"],
    ),
    (
        "score wrong type",
        {"models": two(score="high")},
        ["models[1].score: expected a number (got 'high')"],
    ),
    (
        "score required for score weights",
        {"weights": "score", "models": [{"path": "a", "score": 1}, {"path": "b"}]},
        ["models[1].score: required when weights is 'score'"],
    ),
    (
        "bad dtype",
        {"models": two(dtype="fp8")},
        ["models[1].dtype: must be 'auto', 'float32', 'float16' or 'bfloat16'"],
    ),
    (
        "bad device",
        {"models": two(device="gpu")},
        ["models[1].device: must be cpu, cuda, cuda:N or auto (got 'gpu')"],
    ),
    (
        "bad priority",
        {"models": two(priority="main")},
        ["models[1].priority: must be 'primary' or 'supportive'"],
    ),
    (
        "bad address",
        {"models": two(address="localhost")},
        ["models[1].address: must be host:port"],
    ),
    (
        "shared address",
        {"models": [{"path": "a", "address": "h:1"}, {"path": "b", "address": "h:1"}]},
        ["models[1].address: same address as model 0"],
    ),
    (
        "KV budget of a running worker",
        {"models": [{"path": "a"}, {"path": "b", "address": "h:1", "kv_budget_mib": 512}]},
        ["models[1].kv_budget_mib: sets how `chorus up` loads the model; a worker at an address was loaded by its own"],
    ),
    (
        "loading settings of running workers",
        {
            "models": [
                {"path": "a", "address": "h:1", "dtype": "bfloat16", "max_model_len": 128},
                {"path": "b", "address": "h:2", "quantization": "4bit", "device": "cuda", "max_memory": {0: "1GiB"}},
            ]
        },
        [
            "models[0].dtype: sets how `chorus up` loads the model; a worker at an address was loaded by its own "
            "--dtype",
            "models[0].max_model_len: sets how `chorus up` loads the model; a worker at an address was loaded",
            "models[1].device: sets",
            "models[1].quantization: sets",
            "models[1].max_memory: sets",
        ],
    ),
    (
        "loading settings of discovered pods",
        {"discovery": {"mode": "kubernetes"}, "models": [{"name": "a", "kv_budget_mib": 64}, {"name": "b"}]},
        ["models[0].kv_budget_mib: sets how `chorus up` loads the model; a discovered worker pod was loaded by"],
    ),
    (
        "negative KV budget",
        {"models": two(kv_budget_mib=-1)},
        ["models[1].kv_budget_mib: must be greater than or equal to 0 (got -1)"],
    ),
    (
        "bad max_memory size",
        {"models": two(max_memory={0: "lots"})},
        ["models[1].max_memory: entry 0: size must be like '24GiB'"],
    ),
    (
        "bad max_memory device",
        {"models": two(max_memory={"gpu": "1GiB"})},
        ["models[1].max_memory: key 'gpu'"],
    ),
    (
        "negative num_gpus",
        {"models": two(num_gpus=-1)},
        ["models[1].num_gpus: must be greater than or equal to 0"],
    ),
    (
        "bad transport dtype",
        {"transport": {"dtype": "int8"}, "models": two()},
        ["transport.dtype: must be 'float16' or 'float32'"],
    ),
    (
        "port as string",
        {"server": {"port": "80"}, "models": two()},
        ["server.port: expected an integer (got '80')"],
    ),
    (
        "bool is not an int",
        {"limits": {"max_conversations": True}, "models": two()},
        ["limits.max_conversations: expected an integer"],
    ),
    (
        "top_p out of range",
        {"defaults": {"top_p": 1.5}, "models": two()},
        ["defaults.top_p: must be less than or equal to 1"],
    ),
    (
        "default above limit",
        {
            "defaults": {"max_new_tokens": 100},
            "limits": {"max_new_tokens": 10},
            "models": two(),
        },
        ["defaults.max_new_tokens: 100 exceeds limits.max_new_tokens (10)"],
    ),
    (
        "negative replica wait",
        {"limits": {"replica_wait_s": -1}, "models": two()},
        ["limits.replica_wait_s: must be greater than or equal to 0"],
    ),
    (
        "section not a mapping",
        {"transport": 5, "models": two()},
        ["transport: expected a mapping (got 5)"],
    ),
    (
        "every problem listed",
        {"weights": "avg", "models": [{"path": "a", "scor": 1, "device": "gpu"}]},
        [
            "weights: must be",
            "models[0].scor: unknown key",
            "models[0].device: must be",
        ],
    ),
    (
        "mixed formats",
        {"models": two(), "CONFIG_API_SERVER": []},
        ["models: native key in a GaC-format file"],
    ),
    (
        "gac unknown top key",
        {"CONFIG_API_SERVER": [{"weight": "a"}], "THRESHOLD": 1},
        ["THRESHOLD: unknown key (did you mean 'THRESHOLD_API_SERVER'?)"],
    ),
    (
        "gac missing model list",
        {"NORM_TYPE_API_SERVER": "average"},
        ["CONFIG_API_SERVER: missing required key"],
    ),
    (
        "gac unknown model key",
        {"CONFIG_API_SERVER": [{"weight": "a", "scor": 1}]},
        ["CONFIG_API_SERVER[0].scor: unknown key (did you mean 'score'?)"],
    ),
    (
        "gac native model key",
        {"CONFIG_API_SERVER": [{"path": "a", "name": "a"}]},
        [
            "CONFIG_API_SERVER[0].path: unknown key",
            "CONFIG_API_SERVER[0].weight: missing",
        ],
    ),
    (
        "gac errors under gac names",
        {
            "NORM_TYPE_API_SERVER": "avg",
            "THRESHOLD_API_SERVER": "high",
            "CONFIG_API_SERVER": [{"weight": 5}, {"weight": "b", "priority": "boss"}],
        },
        [
            "NORM_TYPE_API_SERVER: must be 'average' or 'score'",
            "THRESHOLD_API_SERVER: expected a number",
            "CONFIG_API_SERVER[0].weight: expected a string",
            "CONFIG_API_SERVER[1].priority: must be 'primary' or 'supportive'",
        ],
    ),
    (
        "gac two primaries",
        {
            "CONFIG_API_SERVER": [
                {"weight": "a", "priority": "primary"},
                {"weight": "b", "priority": "primary"},
            ]
        },
        ["CONFIG_API_SERVER[1].priority: more than one primary model"],
    ),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_mistakes_are_reported(data: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(data)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, message
    assert message.count("\n") + 1 == len(info.value.problems)


def test_models_by_name_and_address_need_no_path() -> None:
    """The coordinator never loads a model: a running worker's address (or a pod found by Kubernetes
    discovery) names it enough; only a worker `chorus up` starts needs a path."""
    config = load_config({"models": [{"name": "a", "address": "worker-a:50061"}, {"name": "b", "address": "b:1"}]})
    assert [(m.name, m.path, m.address) for m in config.models] == [("a", None, "worker-a:50061"), ("b", None, "b:1")]
    found = load_config({"discovery": {"mode": "kubernetes"}, "models": [{"name": "a"}, {"name": "b"}]})
    assert [m.path for m in found.models] == [None, None]
    with pytest.raises(ConfigError, match=r"models\[1\]\.path: missing: required for a model without an address"):
        load_config({"models": [{"name": "a", "address": "h:1"}, {"name": "b"}]})


def test_server_connection_age() -> None:
    """Client connections are aged out (GOAWAY) after server.max_connection_age_s, so they spread."""
    default = load_config({"models": two()}).server
    assert (default.max_connection_age_s, default.max_connection_age_grace_s) == (300.0, None)
    assert default.max_connection_age_s == DEFAULT_MAX_CONNECTION_AGE_S  # the config says what servers do
    server = load_config({"server": {"max_connection_age_s": 60, "max_connection_age_grace_s": 7.5}, "models": two()})
    assert (server.server.max_connection_age_s, server.server.max_connection_age_grace_s) == (60.0, 7.5)
    never = load_config({"server": {"max_connection_age_s": None}, "models": two()}).server
    assert never.max_connection_age_s is None


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"max_connection_age_s": 0}, "server.max_connection_age_s: must be greater than 0 (got 0)"),
        ({"max_connection_age_s": -5}, "server.max_connection_age_s: must be greater than 0"),
        ({"max_connection_age_s": "5m"}, "server.max_connection_age_s: expected a number (got '5m')"),
        ({"max_connection_age_s": True}, "server.max_connection_age_s: expected a number"),
        ({"max_connection_age_s": 1e12}, "server.max_connection_age_s: must be less than or equal to 2000000"),
        ({"max_connection_age_grace_s": 0}, "server.max_connection_age_grace_s: must be greater than 0"),
        ({"max_connection_age_grace_s": "forever"}, "server.max_connection_age_grace_s: expected a number"),
        ({"max_connection_age": 300}, "server.max_connection_age: unknown key"),
    ],
)
def test_server_connection_age_mistakes(settings: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"server": settings, "models": two()})
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  - path: a\n    score: [1\n", "line 4, column 1: invalid YAML"),
        ("models:\n\t- path: a\n", "line 2, column 1: invalid YAML"),
        (
            "models:\n  - path: a\n    path: b\n",
            "line 3, column 5: invalid YAML: duplicate key 'path'",
        ),
        ("when: 2020-02-30\n", "line 1, column 7: invalid YAML: invalid value"),
        ("a: !!bool maybe\n", "line 1, column 4: invalid YAML"),
        ("[" * 5000, "invalid YAML: nested too deeply"),
        ("# only a comment\n", "file is empty"),
        ("", "file is empty"),
        ("- path: a\n", "(top level): expected a mapping"),
        ("models:\n  - {path: a, scor: 1}\n", "models[0].scor: unknown key"),
    ],
)
def test_file_mistakes_name_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_undecodable_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path)


@pytest.mark.parametrize("data", [None, [1, 2], "models: []", 3])
def test_non_mapping_data(data: Any) -> None:
    with pytest.raises(ConfigError, match=r"\(top level\): expected a mapping"):
        parse_config(data, Path.cwd())


def test_config_error_is_value_error_and_pickles() -> None:
    with pytest.raises(ValueError) as info:
        load_config({"models": []})
    error = info.value
    assert isinstance(error, ConfigError)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems and str(copy) == str(error)


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    (conf_dir / "local-model").mkdir(parents=True)
    text = """\
models:
  - path: local-model        # exists next to the config
  - path: ../elsewhere/m     # explicit relative path, need not exist yet
  - path: org/hub-model      # hub id: kept verbatim
  - path: a/b/c              # more than one '/': cannot be a hub id
  - path: /abs/dir
"""
    config = load_config(write(conf_dir, text))
    assert [m.path for m in config.models] == [
        str(conf_dir / "local-model"),
        str(tmp_path / "elsewhere" / "m"),
        "org/hub-model",
        str(conf_dir / "a" / "b" / "c"),
        "/abs/dir",
    ]
    assert config.model_names == ("local-model", "m", "hub-model", "c", "dir")


def test_mapping_paths_resolve_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config({"models": [{"path": "./m"}, {"path": "org/x"}]})
    assert [m.path for m in config.models] == [str(tmp_path / "m"), "org/x"]


def test_parse_config_uses_base_dir(tmp_path: Path) -> None:
    config = parse_config({"models": [{"path": "../m"}]}, tmp_path / "sub")
    assert config.models[0].path == str(tmp_path / "m")


def test_direct_construction_keeps_path() -> None:
    spec = ModelSpec(name="m", path="../m")
    config = EnsembleConfig(models=(spec,))
    assert config.models[0].path == "../m"


def test_config_is_frozen() -> None:
    config = load_config({"models": two()})
    with pytest.raises(pydantic.ValidationError):
        config.strategy = "threshold"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        config.models[0].score = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- CPU fallback


def test_cpu_adjusted_notes() -> None:
    config = load_config(
        {
            "models": [
                {
                    "name": "SOLAR",
                    "path": "org/solar",
                    "device": "cuda:1",
                    "dtype": "bfloat16",
                    "max_memory": {0: "24GiB"},
                    "num_gpus": 0.5,
                },
                {
                    "name": "auto",
                    "path": "org/auto",
                    "device": "auto",
                    "dtype": "float16",
                },
                {"name": "plain", "path": "org/plain"},
            ]
        }
    )
    adjusted, notes = cpu_adjusted(config, cuda_available=False, cpu_bf16=False)
    assert notes == [
        "models[0] (SOLAR): device cuda:1 ignored, using cpu: no CUDA device",
        "models[0] (SOLAR): dtype bfloat16 ignored, using float32: no CUDA device, and this CPU has no bfloat16 "
        "instructions",
        "models[0] (SOLAR): max_memory ignored: no CUDA device",
        "models[0] (SOLAR): num_gpus ignored: no CUDA device",
        "models[1] (auto): dtype float16 ignored, using float32: no CUDA device",
    ]
    solar, auto, plain = adjusted.models
    assert (solar.device, solar.dtype) == ("cpu", "float32")
    assert solar.max_memory is None and solar.num_gpus is None
    assert (auto.device, auto.dtype) == ("cpu", "float32")
    assert plain == config.models[2]
    assert config.models[0].device == "cuda:1"  # the input is untouched

    # A CPU with bfloat16 instructions keeps what was asked for; float16 it would emulate.
    kept, notes = cpu_adjusted(config, cuda_available=False, cpu_bf16=True)
    assert [m.dtype for m in kept.models] == ["bfloat16", "float32", config.models[2].dtype]
    assert not any("bfloat16" in note for note in notes)
    assert "models[1] (auto): dtype float16 ignored, using float32: no CUDA device" in notes


def test_bfloat16_instructions_are_read_from_the_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not cpu_computes_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_computes_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert cpu_computes_bf16(cpuinfo)
    assert not cpu_computes_bf16(tmp_path / "absent")  # not Linux: no bfloat16 assumed


def test_quantization_without_cuda_is_refused_never_dropped() -> None:
    config = load_config({"models": [{"name": "SOLAR", "path": "org/solar", "quantization": "8bit"}]})
    with pytest.raises(ConfigError, match=r"models\[0\]\.quantization: 8bit needs a CUDA device.*none"):
        cpu_adjusted(config, cuda_available=False)
    assert cpu_adjusted(config, cuda_available=True) == (config, [])  # the worker applies it (bitsandbytes)


def test_the_worker_refuses_quantization_it_cannot_apply() -> None:
    from model_worker.loading import load_model

    with pytest.raises(ValueError, match=r"quantization: 4bit needs a CUDA device .* Use quantization: none"):
        load_model(str(Path(__file__).resolve().parent.parent / "models" / "arith-bpe"), quantization="4bit")


def test_cpu_adjusted_gac_example(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GAC_README_EXAMPLE))
    adjusted, notes = cpu_adjusted(config, cuda_available=False)
    assert "models[0] (SOLAR-10.7B-Instruct-v1.0): max_memory ignored: no CUDA device" in notes
    assert len(notes) == 4
    assert all(m.max_memory is None and m.num_gpus is None for m in adjusted.models)


def test_cpu_adjusted_with_cuda_is_identity() -> None:
    config = load_config({"models": two(device="cuda", max_memory={0: "1GiB"})})
    assert cpu_adjusted(config, cuda_available=True) == (config, [])


def test_num_gpus_is_reported_as_ignored_with_cuda(tmp_path: Path) -> None:
    """GaC's num_gpus has no counterpart here (a worker runs where device or max_memory places it): said so."""
    config = load_config(write(tmp_path, GAC_README_EXAMPLE))
    kept, notes = cpu_adjusted(config, cuda_available=True)
    assert kept == config
    assert notes[0].startswith("models[0] (SOLAR-10.7B-Instruct-v1.0): num_gpus 0.5 ignored: a worker runs where")
    assert len(notes) == sum(m.num_gpus is not None for m in config.models) > 0


# --------------------------------------------------------------------------- fuzz

try:  # the fuzz test is optional: hypothesis is a dev extra
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    hypothesis = None

if hypothesis is not None:
    _KEYS = [
        *EnsembleConfig.model_fields,
        *ModelSpec.model_fields,
        "top_k",
        "dtype",
        "port",
        "host",
        "max_new_tokens",
        "NORM_TYPE_API_SERVER",
        "THRESHOLD_API_SERVER",
        "CONFIG_API_SERVER",
        "weight",
    ]
    _scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats()
        | st.text(max_size=8)
        | st.sampled_from(["gac", "threshold", "primary", "cuda:0", "24GiB", "score", "a:1"])
    )
    _keys = st.sampled_from(_KEYS) | st.text(max_size=5) | st.integers(0, 3) | st.none()
    _data = st.recursive(
        _scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
        max_leaves=25,
    )
    _model = st.dictionaries(st.sampled_from([*ModelSpec.model_fields, "weight"]), _data)

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(
        st.one_of(
            _data,
            st.dictionaries(_keys, _data, max_size=6),
            st.fixed_dictionaries({"models": st.lists(_model, max_size=3)}),
            st.fixed_dictionaries({"CONFIG_API_SERVER": st.lists(_model, max_size=3)}),
        )
    )
    def test_fuzz_only_config_errors(tmp_path_factory: pytest.TempPathFactory, data: Any) -> None:
        base = tmp_path_factory.getbasetemp()
        try:
            config = parse_config(data, base)
        except ConfigError as exc:
            assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
            return
        assert config.models
        with contextlib.suppress(ConfigError):  # quantization without CUDA is refused
            cpu_adjusted(config, cuda_available=False)
        assert sum(config.weight_vector()) == pytest.approx(1.0)

    _LEAVES: list[tuple[Any, ...]] = [
        ("strategy",),
        ("threshold",),
        ("transport",),
        ("transport", "dtype"),
        ("defaults", "max_new_tokens"),
        ("limits",),
        ("server", "port"),
        ("models",),
        ("models", 0),
        ("models", 0, "name"),
        ("models", 0, "path"),
        ("models", 0, "priority"),
        ("models", 1, "address"),
        ("models", 1, "score"),
        ("models", 0, "device"),
        ("models", 0, "max_memory"),
        ("models", 0, "max_memory", 0),
        ("models", 0, "max_memory", "cpu"),
        ("models", 0, "num_gpus"),
    ]

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(st.sampled_from(_LEAVES), _data)
    def test_fuzz_one_bad_value(tmp_path_factory: pytest.TempPathFactory, leaf: tuple[Any, ...], value: Any) -> None:
        data = yaml.safe_load(NATIVE_FULL)
        node = data
        for part in leaf[:-1]:
            node = node[part]
        node[leaf[-1]] = value
        try:
            parse_config(data, tmp_path_factory.getbasetemp())
        except ConfigError as exc:
            assert exc.problems

    @hypothesis.settings(max_examples=200, deadline=None, database=None)
    @hypothesis.given(st.text(alphabet=st.sampled_from(list("ab: -[]{}!&*'\"#|>\n\t0123.,?%@`"))) | st.text())
    def test_fuzz_yaml_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
        path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(path)
        except ConfigError as exc:
            assert exc.problems


def test_the_shipped_tuned_config_is_the_real_pair_tuned() -> None:
    """configs/real-tuned.yaml (make run's tuned column) is `make bench-quality-real`'s common-knowledge pick:
    the same models as configs/real.yaml, with the weights it fitted."""
    real, tuned = load_config(CONFIGS / "real.yaml"), load_config(CONFIGS / "real-tuned.yaml")
    assert [(m.name, m.path) for m in tuned.models] == [(m.name, m.path) for m in real.models]
    assert "Written by `chorus tune`" in (CONFIGS / "real-tuned.yaml").read_text()
