"""A worker loads its tokenizer before it imports the modelling code (transformers' and the engine's, ~100 MB
of modules): the tokenizer's loading parses its vocabulary and merges into short-lived Python objects, and
the holes they leave in the heap are then filled by those modules instead of staying resident beside them
(Gemma 3's worker: ~50 MB; docs/load-test.md, "Worker memory"). The server answers health checks meanwhile,
so it imports none of that code either."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELLING = ("model_worker.runtime", "model_worker.engine", "transformers.modeling_utils")


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return done.stdout.strip()


def test_the_server_imports_no_modelling_code() -> None:
    code = f"import sys\nimport model_worker.server\nprint([m for m in {MODELLING!r} if m in sys.modules])"
    assert _run(code) == "[]"


# main.run with a load_model that notes what is imported when it is called, then fails the load.
RUN_PROBE = f"""
import asyncio, sys
from chorus_common.worker_args import WorkerArgs
from model_worker import loading, main

seen = []

def load_model(*args, **kwargs):
    seen.extend(m for m in {MODELLING!r} if m in sys.modules)
    raise RuntimeError("stop here")

loading.load_model = load_model
try:
    asyncio.run(main.run(WorkerArgs(model="unused")))
except main.LoadFailed:
    print(seen)
"""


def test_the_worker_loads_its_model_before_importing_the_modelling_code() -> None:
    assert _run(RUN_PROBE) == "[]"
