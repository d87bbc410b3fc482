"""Every value of the Helm chart is typed in values.schema.json, so a wrong one fails at `helm install`
(with the schema's words) instead of rendering a broken manifest. Many values are typed through a
`$ref` to the schema's definitions (worker.podDisruptionBudget, worker.strategy, the resources): the
walk follows them, and a value of the wrong type at every leaf is refused by a real validator."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helm import CHART


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """node, with a local $ref ("#/definitions/x") followed."""
    while "$ref" in node:
        target: Any = schema
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _child(schema: dict[str, Any], node: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The schema of node's key: a named property, else additionalProperties when it is a schema."""
    if key in node.get("properties", {}):
        return _resolve(schema, node["properties"][key])
    extra = node.get("additionalProperties")
    return _resolve(schema, extra) if isinstance(extra, dict) else None


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf: a scalar, a list, or an empty mapping."""
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _leaves(inner, f"{path}.{key}" if path else key)
    else:
        yield path, value


def untyped(values: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """The paths of values' leaves the schema gives no type (nor enum) to, or does not know at all."""
    missing = []
    for path, _ in _leaves(values):
        node: dict[str, Any] | None = _resolve(schema, schema)
        for key in path.split("."):
            node = _child(schema, node, key) if node is not None else None
        if node is None or not ("type" in node or "enum" in node):
            missing.append(path)
    return missing


VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def test_every_value_in_values_yaml_has_a_type_in_the_schema() -> None:
    assert untyped(VALUES, SCHEMA) == []


@pytest.mark.parametrize("path", [path for path, _ in _leaves(VALUES)])
def test_a_value_of_the_wrong_type_is_refused(path: str) -> None:
    """values.yaml validates; with any one leaf of the wrong type (an object for a scalar or a list, a
    string for a mapping) it does not."""
    validator = jsonschema.Draft7Validator(SCHEMA)
    assert validator.is_valid(VALUES), next(validator.iter_errors(VALUES)).message
    values = copy.deepcopy(VALUES)
    *parents, leaf = path.split(".")
    node = values
    for key in parents:
        node = node[key]
    node[leaf] = "not a mapping" if isinstance(node[leaf], dict) else {"not": "a scalar"}
    assert not validator.is_valid(values), f"{path}: {node[leaf]!r} accepted"


def test_the_walk_finds_an_untyped_value() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {}, "c": {"$ref": "#/definitions/n"}}}},
        "definitions": {"n": {"type": "integer"}},
    }
    assert untyped({"a": {"b": 1, "c": 2, "d": 3}}, schema) == ["a.b", "a.d"]
