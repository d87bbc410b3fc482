"""The generated stubs in chorus/v1 are exactly what `make protos` produces from protos/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    protos = sorted((ROOT / "protos" / "chorus" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *map(str, protos),
    ]
    assert protoc.main(args) == 0
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc generated nothing"
    for rel in generated:
        committed = ROOT / rel
        if not committed.exists():
            pytest.fail(f"{rel} is missing: run `make protos`")
        if committed.read_text() != (tmp_path / rel).read_text():
            pytest.fail(f"{rel} drifted from protos/: run `make protos`")


def test_sdk_imports_without_torch() -> None:
    """The client SDK must install and import where torch is absent."""
    import subprocess

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import chorus, chorus.cli, coordinator.server, chorus_local.cluster, coordinator.strategies\n"
        # what `chorus coordinator` (the slim image) does before serving remote workers
        "chorus.cli._load('configs/default.yaml', local_workers=False)\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
