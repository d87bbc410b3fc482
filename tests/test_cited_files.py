"""Docs and docstrings cite files the repository has: each `*.md` a module names, and each repository
path (`dir/file.ext`) its docstrings and comments name."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("chorus", "chorus_common", "coordinator", "model_worker", "chorus_local", "scripts")
DOCUMENT = re.compile(r"(?<![\w/.-])([\w/.-]+\.md)\b")
# A path inside the repository: one of its top-level folders, then a file with an extension.
TOPS = ("chorus", "chorus_common", "coordinator", "model_worker", "chorus_local", "scripts", "tests", "docs")
TOP = "|".join((*TOPS, "configs", "deploy", "protos", "requirements", "models"))
REPO_PATH = re.compile(rf"(?<![\w/.-])((?:{TOP})/[\w/.-]*\w\.(?:py|md|yaml|json|proto|txt|sh))\b")


def cited(text: str) -> set[str]:
    return set(DOCUMENT.findall(text)) | set(REPO_PATH.findall(text))


def missing(files: list[Path]) -> list[str]:
    """`file: cited name` for each citation no file of the repository answers."""
    out = []
    for path in files:
        for name in sorted(cited(path.read_text())):
            if not ((ROOT / name).exists() or (ROOT / "docs" / name).exists()):
                out.append(f"{path.relative_to(ROOT)}: {name}")
    return out


def test_every_cited_file_exists() -> None:
    sources = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if "_pb2" not in p.name]
    assert missing(sources) == []


def test_a_missing_file_is_found() -> None:
    assert cited('"""See DESIGN.md and coordinator/nope.py, not x.md5 or tmp/a.py."""') == {
        "DESIGN.md",
        "coordinator/nope.py",
    }
