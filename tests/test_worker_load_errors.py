"""A worker whose model cannot load: one clear line naming the model, the file and why, and a non-zero exit.

The worker runs as its own process (`chorus worker`), as the container runs it. Unreadable weights
need a user the file's mode shuts out: root (CI here) reads every file whatever its mode, so there the
weights belong to another user and the worker runs without root's CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH
(setpriv), as a container's root without them would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster_helpers import MODELS, ROOT

NOBODY = 65534
# Root without the capabilities that let it read any file (util-linux's setpriv; exec drops them).
WITHOUT_DAC_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A copy of an embedded model, and a cache folder for the worker."""
    (tmp_path / "cache").mkdir()
    return Path(shutil.copytree(MODELS / "arith-bpe", tmp_path / "arith-bpe"))


def run_worker(model: Path, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    cache = model.parent / "cache"
    env = {
        **os.environ,
        "HF_HOME": str(cache),
        "XDG_CACHE_HOME": str(cache),
        "HF_HUB_OFFLINE": "1",
        "CHORUS_LOG_FORMAT": "text",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    chorus = str(Path(sys.executable).parent / "chorus")  # the container's entrypoint: `chorus worker`
    command = [*(prefix or []), chorus, "worker", "--model", str(model), "--port", "0", "--grace", "1"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=model.parent)


def after_loading(stderr: str) -> list[str]:
    """The worker's stderr lines after its 'loading <model>' line."""
    lines = stderr.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if " loading " in line)
    return lines[start + 1 :]


def assert_no_teardown_noise(stderr: str) -> None:
    for noise in ("Traceback", "Event loop is closed", "never awaited", "Exception ignored"):
        assert noise not in stderr, stderr


def test_unreadable_weights_name_the_file_the_uid_and_the_fix(model_copy: Path) -> None:
    weights = model_copy / "model.safetensors"
    weights.chmod(0o600)  # as save_pretrained writes it, for its owner alone
    prefix = None
    if os.getuid() == 0:  # another user's file, read by root without its override
        os.chown(weights, NOBODY, NOBODY)
        prefix = WITHOUT_DAC_OVERRIDE
    else:  # one's own file with a mode that shuts out the owner too
        weights.chmod(0o000)
    out = run_worker(model_copy, prefix)
    assert out.returncode == 1, out.stderr
    [line] = after_loading(out.stderr)
    assert f"cannot read the model file {weights} as uid {os.getuid()}" in line, line
    assert f"chmod -R a+rX {model_copy}" in line and "runAsUser" in line, line
    assert "No such file" not in out.stderr, out.stderr  # transformers' word for an unreadable file
    assert_no_teardown_noise(out.stderr)


def test_a_model_that_fails_to_load_ends_the_worker_with_one_line(model_copy: Path) -> None:
    config = model_copy / "config.json"
    config.write_text("{ not json", encoding="utf-8")
    out = run_worker(model_copy)
    assert out.returncode == 1, out.stderr
    [line] = after_loading(out.stderr)
    assert f"cannot load model {model_copy}: " in line and "config.json" in line, line
    assert_no_teardown_noise(out.stderr)
