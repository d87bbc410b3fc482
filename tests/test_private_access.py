"""Production code reads no other library's private attributes (`site._server`, `request._read_bytes`):
those change without notice between releases. A private name counts as the project's own when the
project defines it somewhere (assigns or declares it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("chorus", "chorus_common", "coordinator", "model_worker", "chorus_local")
# Reads that have no public twin yet, each with its reason.
ALLOWED: set[tuple[str, str]] = set()


def _sources() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(ROOT)): ast.parse(path.read_text(), str(path))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "_pb2" not in path.name
    }


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own_names(trees: dict[str, ast.Module]) -> set[str]:
    """Private names the project defines: attributes it assigns, and its functions, classes and fields."""
    own = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                own.add(node.target.id)
            elif isinstance(node, ast.Assign):
                own |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return {name for name in own if _private(name)}


def foreign_private_reads(trees: dict[str, ast.Module]) -> list[tuple[str, str]]:
    """(file, attribute) of each read of a private attribute the project does not define."""
    own = _own_names(trees)
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and _private(node.attr):
                name = node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
            ):
                name = node.args[1].value
            if name is not None and name not in own and (path, name) not in ALLOWED:
                found.append((path, name))
    return found


def test_no_private_attribute_of_another_library_is_read() -> None:
    assert foreign_private_reads(_sources()) == []


def test_the_scan_finds_them() -> None:
    code = "def start(site, request):\n    site._server\n    getattr(request, '_read_bytes', None)\n"
    trees = {"x.py": ast.parse(code), "y.py": ast.parse("class A:\n    def f(self):\n        self._mine = 1\n")}
    trees["z.py"] = ast.parse("def g(a):\n    return a._mine\n")
    assert foreign_private_reads(trees) == [("x.py", "_server"), ("x.py", "_read_bytes")]
