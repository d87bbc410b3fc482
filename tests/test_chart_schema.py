"""The Helm chart's strategy values and the config's strategy sections agree: the chart's schema is
generated from the strategies' Settings (scripts/chart_schema.py), its defaults are valid settings,
and what the chart renders is what it was given."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from coordinator.config import ConfigError, load_config
from coordinator.strategies import SECTIONS, STRATEGIES
from coordinator.strategies.settings import NAMES_A_MODEL
from tests.helm import CHART

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "chart_schema.py"
MODELS = [{"name": "a", "path": "org/a"}, {"name": "b", "path": "org/b"}]
# ensemble's keys the configmap template renders by hand; every other one is a strategy's section.
CORE = {"strategy", "weights", "threshold", "transport", "defaults", "limits"}


@pytest.fixture(scope="module")
def chart_schema() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chorus_chart_schema", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _as_config(section: dict[str, Any]) -> dict[str, Any]:
    """A chart section as the configmap template renders it: snake_case keys, "" left out."""
    snake = {"".join(f"_{c.lower()}" if c.isupper() else c for c in key): v for key, v in section.items()}
    return {key: v for key, v in snake.items() if v != ""}


def test_the_committed_schema_is_the_generated_one(chart_schema: ModuleType) -> None:
    text = (CHART / "values.schema.json").read_text(encoding="utf-8")
    assert chart_schema.render(text) == text, "values.schema.json is out of date: run `make chart-schema`"
    ensemble = json.loads(text)["properties"]["ensemble"]["properties"]
    assert ensemble["strategy"]["enum"] == list(STRATEGIES)
    assert set(ensemble) - CORE == set(SECTIONS)


def test_camel_case_keys_turn_back_into_the_settings_fields(chart_schema: ModuleType) -> None:
    for settings in SECTIONS.values():
        for name in settings.model_fields:
            assert _as_config({chart_schema.camel(name): 1}) == {name: 1}, name


def test_every_setting_says_what_it_does() -> None:
    missing = [f"{s.__name__}.{n}" for s in SECTIONS.values() for n, f in s.model_fields.items() if not f.description]
    assert missing == []


def test_the_chart_defaults_are_valid_strategy_settings() -> None:
    ensemble = _values()["ensemble"]
    assert set(ensemble) - CORE == set(SECTIONS), "every strategy with settings has its values in values.yaml"
    sections = {name: _as_config(ensemble[name]) for name in SECTIONS}
    config = load_config({"models": MODELS, **sections})
    for name, settings in SECTIONS.items():
        assert getattr(config, name) == settings(**sections[name])
        assert set(sections[name]) | {k for k, v in ensemble[name].items() if v == ""} >= set(settings.model_fields)


def _candidates(node: dict[str, Any]) -> list[Any]:
    """Values on and past the schema's bounds, and of the wrong types."""
    if "enum" in node:
        return [*node["enum"], "nope", 1]
    if node.get(next(iter(NAMES_A_MODEL))) or node.get("pattern"):
        return ["", "a", "b", "A b", 3]
    kind = node["type"]
    if kind == "boolean":
        return [True, False, "true", 1]
    step = 1 if kind == "integer" else 0.01
    out: list[Any] = ["1", None, True] + ([1.5] if kind == "integer" else [])
    for key in ("minimum", "maximum"):
        if key in node:
            out += [node[key], node[key] + (step if key == "maximum" else -step)]
    return out


@pytest.mark.parametrize("name", list(SECTIONS))
def test_the_chart_schema_accepts_exactly_what_the_config_accepts(name: str) -> None:
    """Each setting, on and past its bounds: the chart refuses it if and only if the config does."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    section = schema["properties"]["ensemble"]["properties"][name]
    settings = SECTIONS[name]
    for field in settings.model_fields:
        key = next(k for k in section["properties"] if _as_config({k: 1}) == {field: 1})
        for value in _candidates({**settings.model_json_schema()["properties"][field], **section["properties"][key]}):
            chart_ok = jsonschema.Draft7Validator(section).is_valid({key: value})
            try:
                load_config({"models": MODELS, name: _as_config({key: value})})
                config_ok = True
            except ConfigError:
                config_ok = False
            assert chart_ok == config_ok, f"ensemble.{name}.{key}: {value!r} (chart {chart_ok}, config {config_ok})"
    assert not jsonschema.Draft7Validator(section).is_valid({"nope": 1})  # both are closed
    with pytest.raises(ConfigError, match=rf"{name}\.nope: unknown key"):
        load_config({"models": MODELS, name: {"nope": 1}})


def test_the_chart_renders_each_strategy_section_as_given(helm: str) -> None:
    """The configmap renders ensemble.<strategy> generically: the defaults, and a value of every setting set."""
    ensemble = _values()["ensemble"]
    sets = ["--set", "models[0].name=a", "--set", "models[0].source.hub.id=org/a"]
    sets += ["--set", "models[1].name=b", "--set", "models[1].source.hub.id=org/b"]
    out = subprocess.run(
        [helm, "template", "chorus", str(CHART), *sets, "--set", "ensemble.safe.drafter=b"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    (config_map,) = [
        d
        for d in yaml.safe_load_all(out.stdout)
        if d and d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")
    ]
    rendered = yaml.safe_load(config_map["data"]["config.yaml"])
    for name in SECTIONS:
        expected = _as_config({**ensemble[name], **({"drafter": "b"} if name == "safe" else {})})
        assert rendered[name] == expected, name
    load_config({**rendered, "models": MODELS})
