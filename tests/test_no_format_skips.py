"""The formatter formats everything: no `# fmt: skip` markers (lines hand-laid against `ruff format`)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("chorus", "chorus_common", "chorus_local", "coordinator", "model_worker", "scripts", "tests")

PENDING: set[str] = set()
MARKER = "# fmt: " + "skip"  # spelt in two so this file does not hold one


def test_no_module_keeps_lines_from_the_formatter() -> None:
    marked = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if str(path.relative_to(ROOT)) not in PENDING
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.rstrip().endswith(MARKER)
    ]
    assert marked == []
