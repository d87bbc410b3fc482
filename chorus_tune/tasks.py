"""The real tasks of `make bench-quality-real` (scripts/real_tasks.py in a source checkout), as tuning items."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from chorus_tune.items import Item

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "real_tasks.py"


class TaskError(ValueError):
    pass


@dataclass(frozen=True)
class Task:
    name: str
    items: list[Item]
    max_new_tokens: int
    stop: tuple[str, ...]


def _module() -> ModuleType:
    if not SCRIPT.is_file():
        raise TaskError(f"--task needs a source checkout ({SCRIPT} is missing); use --data instead")
    if "real_tasks" in sys.modules:
        return sys.modules["real_tasks"]
    spec = importlib.util.spec_from_file_location("real_tasks", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_tasks"] = module
    spec.loader.exec_module(module)
    return module


def load(name: str, limit: int | None) -> Task:
    tasks = _module()
    if name not in tasks.TASKS:
        raise TaskError(f"--task: unknown task {name!r}; valid: {', '.join(tasks.TASKS)}")
    task = tasks.TASKS[name]
    try:
        loaded = task.load(limit)
    except RuntimeError as exc:
        raise TaskError(str(exc)) from None
    items = [Item(i.answer, prompt=i.prompt, check=i.check) for i in loaded]
    return Task(task.dataset, items, task.max_new_tokens, tuple(task.stop))
