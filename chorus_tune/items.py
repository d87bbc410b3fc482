"""Items to tune on: a JSON-lines file of ``{"prompt" | "messages", "answer"}``, or a named real task;
their grading, and the deterministic dev/test split."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Item:
    answer: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    check: Callable[[str], bool] | None = field(default=None, compare=False)  # None: first line exact match

    def is_correct(self, output: str) -> bool:
        if self.check is not None:
            return self.check(output)
        return first_line(output) == self.answer.strip()

    def gold_continuations(self) -> tuple[bytes, ...]:
        """The byte strings a right answer may start with: the answer, or the answer after a space (a
        plain prompt ends before it)."""
        answer = self.answer.strip().encode()
        return (answer, b" " + answer)


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip() if text.strip() else ""


class ItemsError(ValueError):
    """A data file that cannot be used; the message names the line and the field."""


def load_jsonl(path: Path) -> list[Item]:
    items: list[Item] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ItemsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ItemsError(f"{where}: invalid JSON: {exc.msg}") from None
        items.append(_item(row, where))
    if not items:
        raise ItemsError(f"{path}: no items")
    return items


def _item(row: object, where: str) -> Item:
    if not isinstance(row, dict):
        raise ItemsError(f"{where}: expected an object with prompt or messages, and answer")
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise ItemsError(f"{where}: answer: expected a non-empty string")
    if ("prompt" in row) == ("messages" in row):
        raise ItemsError(f"{where}: give exactly one of prompt or messages")
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise ItemsError(f"{where}: prompt: expected a non-empty string")
        return Item(answer, prompt=row["prompt"])
    messages = row["messages"]
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise ItemsError(f"{where}: messages: expected a non-empty list of {{role, content}} strings")
    return Item(answer, messages=tuple((m["role"], m["content"]) for m in messages))


def split(items: Sequence[Item], dev_fraction: float = 0.5, seed: int = 0) -> tuple[list[Item], list[Item]]:
    """(dev, test): a seeded shuffle cut at dev_fraction; the same items and seed give the same split."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = max(1, min(len(items) - 1, round(len(items) * dev_fraction)))
    return [items[i] for i in sorted(order[:cut])], [items[i] for i in sorted(order[cut:])]
