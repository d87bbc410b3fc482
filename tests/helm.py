"""The chart under test, rendered by the real helm binary that scripts/fetch_helm.sh fetches (never by hand)."""

from __future__ import annotations

import subprocess
from typing import Any

import yaml

from tests.cluster_helpers import ROOT

CHART = ROOT / "deploy" / "helm" / "chorus"


def fetch_helm() -> str:
    subprocess.run(["bash", str(ROOT / "scripts" / "fetch_helm.sh")], check=True, capture_output=True)
    return str(ROOT / ".tools" / "bin" / "helm")


def render(helm: str, *args: str) -> list[dict[str, Any]]:
    """The chart's documents with these helm arguments (values files, --set), in namespace ml."""
    out = subprocess.run(
        [helm, "template", "chorus", str(CHART), "--namespace", "ml", *args], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]
