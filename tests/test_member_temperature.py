"""Per-member temperature (models[].temperature): validated, exact at 1, applied before any strategy mixes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import chorus
from chorus_local.cluster import WorkerProcess
from coordinator.config import ConfigError, parse_config
from coordinator.union_dist import UnionDist, tempered
from tests.cluster_helpers import LoopThread, coordinator, make_config

PROMPTS = ["12+35=", "48+27=", "7+86=", "99+99="]


def _model(**extra: object) -> dict[str, object]:
    return {"name": "m", "path": "org/model", **extra}


def test_temperature_defaults_to_one_and_is_validated() -> None:
    assert parse_config({"models": [_model()]}, Path.cwd()).models[0].temperature == 1.0
    assert parse_config({"models": [_model(temperature=0.5)]}, Path.cwd()).models[0].temperature == 0.5
    for bad, message in [
        (0, "greater than 0"),
        (-1, "greater than 0"),
        ("hot", "expected a number"),
        (1000, "less than or equal to 100"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config({"models": [_model(), {"name": "n", "path": "org/other", "temperature": bad}]}, Path.cwd())
        assert caught.value.problems[0].startswith("models[1].temperature: "), caught.value.problems
        assert message in caught.value.problems[0]


def test_tempered_is_the_power_renormalised() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(50))
    dist = UnionDist(np.arange(50, dtype=np.int64) * 3, probs)
    for t in (0.3, 1.0, 2.5):
        out, shift = tempered(dist, t)
        expected = probs ** (1 / t) / (probs ** (1 / t)).sum()
        np.testing.assert_allclose(out.probs, expected, rtol=1e-12)
        assert out.uids is dist.uids
        # a log-probability of the same model maps onto the tempered scale with the shift
        np.testing.assert_allclose(np.log(probs) / t + shift, np.log(out.probs), rtol=1e-9, atol=1e-12)
    sharper = tempered(dist, 0.5)[0]
    assert sharper.max_prob() > dist.max_prob() and sharper.top() == dist.top()
    # a top-k answer keeps the mass it was shipped with
    part = UnionDist(dist.uids[:10], probs[:10])
    assert tempered(part, 2.0)[0].probs.sum() == pytest.approx(probs[:10].sum())


def test_temperature_reaches_the_strategy(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> None:
    """A primary made unsure by a high temperature is never trusted alone by `threshold`; at temperature 1
    (written out) it decides every step alone and the texts are the primary's own."""
    bpe, sp = default_workers["arith-bpe"], default_workers["arith-sp"]
    with coordinator(loop, make_config([bpe])) as target, chorus.Client(target, timeout=60) as client:
        primary_alone = [client.generate(prompt=p, max_new_tokens=8).text for p in PROMPTS]
    results = {}
    for temperature in (1.0, 100.0):
        extras = [{"priority": "primary", "temperature": temperature}, {}]
        config = make_config([bpe, sp], strategy="threshold", threshold=0.05, model_extras=extras)
        with coordinator(loop, config) as target, chorus.Client(target, timeout=60) as client:
            results[temperature] = [client.generate(prompt=p, max_new_tokens=8) for p in PROMPTS]
    assert [r.text for r in results[1.0]] == primary_alone
    assert all(r.usage.steps_ensembled == 0 for r in results[1.0])
    assert all(r.usage.steps_ensembled == r.usage.steps > 0 for r in results[100.0])
