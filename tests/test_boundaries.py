"""The rooms of the house: the two services import nothing of each other, the SDK runs without the
servers' dependencies, and no module imports another's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("chorus", "chorus_common", "chorus_local", "coordinator", "model_worker", "chorus_tune")
# What `pip install chorus-ensemble` (no extras) must be enough for.
SERVER_ONLY = (
    "numpy",
    "yaml",
    "pydantic",
    "kubernetes",
    "aiohttp",
    "prometheus_client",
    "grpc_health",
    "grpc_reflection",
    "tqdm",
    "torch",
    "transformers",
)


def _sources(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((ROOT / d).rglob("*.py")) if "_pb2" not in p.name]


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names imported from it, at module level) for each import in path."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, [a.name for a in node.names], id(node) in top))
    return found


@pytest.mark.parametrize(("service", "other"), [("model_worker", "coordinator"), ("coordinator", "model_worker")])
def test_a_service_imports_nothing_of_the_other(service: str, other: str) -> None:
    offending = [
        f"{p.relative_to(ROOT)}: {module}"
        for p in _sources(service)
        for module, _, _ in _imports(p)
        if module == other or module.startswith(other + ".")
    ]
    assert not offending


def test_tuning_runs_on_the_coordinator_side() -> None:
    """chorus_tune drives workers over gRPC, as the coordinator does: no worker code, no torch."""
    offending = [
        f"{p.relative_to(ROOT)}: {module}"
        for p in _sources("chorus_tune")
        for module, _, _ in _imports(p)
        if module.split(".")[0] in ("model_worker", "torch", "transformers")
    ]
    assert not offending


def test_shared_code_and_the_sdk_import_no_service() -> None:
    """chorus_common never; the SDK's CLI only inside the command that runs a server (or the local cluster)."""
    for path in _sources("chorus_common", "chorus"):
        for module, _, at_top in _imports(path):
            if module.split(".")[0] in ("coordinator", "model_worker", "chorus_local"):
                assert path.parent.name == "chorus" and not at_top, f"{path.relative_to(ROOT)}: {module}"


@pytest.mark.parametrize("service", ["coordinator", "model_worker"])
def test_no_service_imports_the_local_cluster(service: str) -> None:
    """chorus_local runs the services on one machine (`chorus up`); a service never needs it."""
    offending = [
        f"{p.relative_to(ROOT)}: {module}"
        for p in _sources(service)
        for module, _, _ in _imports(p)
        if module.split(".")[0] == "chorus_local"
    ]
    assert not offending


def test_no_module_imports_another_modules_private_names() -> None:
    offending = [
        f"{p.relative_to(ROOT)}: from {module} import {name}"
        for p in _sources(*PACKAGES, "scripts")
        for module, names, _ in _imports(p)
        if module.split(".")[0] in PACKAGES
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not offending


def test_the_sdk_installs_with_grpc_and_protobuf_alone() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(d.split(">")[0].split("=")[0] for d in project["dependencies"]) == ["grpcio", "protobuf"]
    extras = project["optional-dependencies"]
    assert {"coordinator", "worker"} <= set(extras)


def test_the_sdk_and_its_client_commands_run_without_the_servers_dependencies() -> None:
    """In a process where every server-only package fails to import, as in an SDK-only install."""
    script = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_ONLY!r}:
            raise ImportError(f"{{name}} is not installed (an SDK-only install)")
sys.meta_path.insert(0, Refuse())
import chorus, chorus.cli
client = chorus.Client("127.0.0.1:1", timeout=1)
client.close()
for command in (["generate", "--help"], ["models", "--help"], ["worker", "--help"]):
    try:
        chorus.cli.main(command)
    except SystemExit as e:
        assert e.code == 0, (command, e.code)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
