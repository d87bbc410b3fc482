"""Models of different tokenizer families that each write the same text alone write it together, under
every strategy, where the text has characters each family splits its own way: an emoji as four byte
pieces (SentencePiece with byte fallback), as two to four tokens (byte-level BPEs of different vocabularies).
The models are trained to write one continuation (tests/agreeing_models.py): off their own tokens, they
write noise, so a character conditioned on wrongly shows in the text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import chorus
from chorus_local.cluster import WorkerProcess
from tests.agreeing_models import CONTINUATION, PROMPT, train_to_say
from tests.cluster_helpers import LoopThread, coordinator, make_config, worker

FAMILIES = ("sentencepiece", "sentencepiece_legacy", "byte_level", "byte_level_narrow", "byte_level_mid")
# Each strategy's request options: me only samples (near-greedy here: each model keeps its argmax).
STRATEGIES: dict[str, dict[str, object]] = {
    "gac": {},
    "threshold": {"threshold": 0.99},  # the primary (the first model) is asked first, the others when unsure
    "unite": {},
    "safe": {},
    "chared": {},
    "me": {"temperature": 0.05, "seed": 1},
}
COMBINATIONS = [
    ("sentencepiece", "byte_level"),
    ("byte_level", "sentencepiece"),
    ("byte_level", "byte_level_narrow"),
    ("byte_level_narrow", "byte_level"),
    ("sentencepiece_legacy", "byte_level_narrow"),
    ("sentencepiece", "sentencepiece_legacy"),
    ("sentencepiece", "byte_level", "byte_level_narrow", "byte_level_mid"),
]


@pytest.fixture(scope="module")
def agreeing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WorkerProcess]]:
    root: Path = tmp_path_factory.mktemp("agreeing")
    started: dict[str, WorkerProcess] = {}
    try:
        for family in FAMILIES:
            started[family] = worker(train_to_say(root / family, family), family)
        yield started
    finally:
        for w in started.values():
            w.stop()


def _serve(loop: LoopThread, workers: list[WorkerProcess], strategies: dict[str, dict[str, object]]) -> dict[str, str]:
    config = make_config(workers, model_extras=[{"priority": "primary"}] + [{}] * (len(workers) - 1))
    with coordinator(loop, config) as target, chorus.Client(target, timeout=120) as client:
        return {
            name: client.generate(prompt=PROMPT, max_new_tokens=24, strategy=name, **options).text  # type: ignore[arg-type]
            for name, options in strategies.items()
        }


def test_each_model_alone_writes_the_continuation(loop: LoopThread, agreeing: dict[str, WorkerProcess]) -> None:
    for family, w in agreeing.items():
        assert _serve(loop, [w], {"gac": {}}) == {"gac": CONTINUATION}, family


@pytest.mark.parametrize("families", COMBINATIONS, ids="+".join)
def test_models_that_agree_write_their_text_together_under_every_strategy(
    loop: LoopThread, agreeing: dict[str, WorkerProcess], families: tuple[str, ...]
) -> None:
    served = _serve(loop, [agreeing[f] for f in families], STRATEGIES)
    assert served == dict.fromkeys(STRATEGIES, CONTINUATION)
