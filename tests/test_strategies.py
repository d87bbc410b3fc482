"""ME, UniTE, SAFE and CharED served end to end, against in-process references where one exists."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

import pytest

import chorus
from chorus_common.types import Prompt
from chorus_local.cluster import WorkerProcess
from coordinator.config import parse_config
from coordinator.workers import Transport, WorkerClient
from tests.cluster_helpers import MODELS, ROOT, LoopThread, coordinator, make_config, worker
from tests.reference import END, ReferenceModel

ME = {"strategy": "me", "defaults": {"temperature": 1.0}}  # me refuses greedy defaults
PROMPTS = ["12+35=", "48+27=", "7+86=", "3+4=", "99+99=", "héllo 你好 🙂 "]


@pytest.fixture(scope="module")
def pair(default_workers: dict[str, WorkerProcess]) -> list[WorkerProcess]:
    return [default_workers["arith-bpe"], default_workers["arith-sp"]]


@pytest.fixture(scope="module")
def twin() -> Iterator[WorkerProcess]:
    w = worker(MODELS / "arith-bpe", "arith-bpe-twin")
    yield w
    w.stop()


@pytest.fixture(scope="module")
def references() -> list[ReferenceModel]:
    return [ReferenceModel(MODELS / "arith-bpe"), ReferenceModel(MODELS / "arith-sp")]


def _generate(
    loop: LoopThread, workers: list[WorkerProcess], prompts: list[str], **kwargs: object
) -> list[chorus.Result]:
    config = make_config(workers, **kwargs.pop("config", {}))  # type: ignore[arg-type]
    with coordinator(loop, config) as target, chorus.Client(target, timeout=120) as client:
        return [client.generate(prompt=p, **kwargs) for p in prompts]


def _texts(results: list[chorus.Result]) -> list[str]:
    return [r.text for r in results]


# --------------------------------------------------------------------------- me


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: Counter[bytes | None], expected: dict[bytes | None, float], n: int) -> tuple[float, int]:
    """Chi-square statistic over outcomes expected at least 5 times (the rest pooled)."""
    stat, df, pooled_seen, pooled_expected = 0.0, -1, n, 0.0
    for key, p in expected.items():
        if n * p >= 5:
            stat += (counts[key] - n * p) ** 2 / (n * p)
            pooled_seen -= counts[key]
            df += 1
        else:
            pooled_expected += n * p
    if pooled_expected > 0:
        stat += (pooled_seen - pooled_expected) ** 2 / max(pooled_expected, 1e-9)
        df += 1
    return stat, df


def test_me_samples_the_weighted_mixture(
    loop: LoopThread, pair: list[WorkerProcess], references: list[ReferenceModel]
) -> None:
    prompt, n, weights = "7+", 400, {"arith-bpe": 3.0, "arith-sp": 1.0}
    config = make_config(pair, strategy="me", defaults={"temperature": 1.0})
    counts: Counter[bytes | None] = Counter()
    with coordinator(loop, config) as target, chorus.Client(target, timeout=120) as client:
        for seed in range(n):
            r = client.generate(prompt=prompt, max_new_tokens=1, temperature=1.0, seed=seed, weights=weights)
            counts[r.text.encode() if r.text else END] += 1
    single = [m.next_bytes(m.start(prompt)) for m in references]

    def mixture(w: list[float]) -> dict[bytes | None, float]:
        keys = set(single[0]) | set(single[1])
        return {k: sum(wi * d.get(k, 0.0) for wi, d in zip(w, single, strict=True)) for k in keys}

    stat, df = _chi2(counts, mixture([0.75, 0.25]), n)
    assert stat < _chi2_critical(df), (stat, df, counts.most_common(8))
    # The test has power: the mixture with the weights swapped is rejected.
    wrong, wrong_df = _chi2(counts, mixture([0.25, 0.75]), n)
    assert wrong > _chi2_critical(wrong_df), (wrong, wrong_df)


def test_me_costs_one_forward_pass_per_token(loop: LoopThread, pair: list[WorkerProcess]) -> None:
    results = _generate(loop, pair, PROMPTS[:5], config=ME, max_new_tokens=12, temperature=1.0, seed=7)
    for r in results:
        passes = sum(m.forward_passes for m in r.usage.models)
        # One pass per drawn token (the end-of-sequence draw included); catching up rides along.
        assert passes == r.usage.completion_tokens + (r.finish_reason == "stop"), r.usage
        assert r.usage.steps_ensembled == 0
    again = _generate(loop, pair, PROMPTS[:5], config=ME, max_new_tokens=12, temperature=1.0, seed=7)
    assert _texts(again) == _texts(results)  # seeded: reproducible


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "temperature"),
        ({"temperature": 1.0, "top_k": 5}, "top_k"),
        ({"temperature": 1.0, "top_p": 0.9}, "top_p"),
    ],
)
def test_me_refuses_what_it_cannot_sample_exactly(
    loop: LoopThread, pair: list[WorkerProcess], kwargs: dict[str, float], field: str
) -> None:
    with coordinator(loop, make_config(pair)) as target, chorus.Client(target, timeout=60) as client:
        with pytest.raises(chorus.InvalidArgument, match=field):
            client.generate(prompt="1+2=", strategy="me", **kwargs)
        assert client.generate(prompt="1+2=", strategy="gac").text == "3"  # still serving


# --------------------------------------------------------------------------- unite


def _unite_reference(models: list[ReferenceModel], prompt: str, max_new: int) -> str:
    """Greedy UniTE with every entry a candidate: a candidate missing from a model's own options
    takes the probability of its longest option that is a prefix of it; softmax over candidates."""
    generated = b""
    states = [m.start(prompt) for m in models]
    for _ in range(max_new):
        dists = [m.next_bytes(state) for m, state in zip(models, states, strict=True)]
        candidates = set().union(*dists)
        mixed = dict.fromkeys(candidates, 0.0)
        for dist in dists:

            def score(c: bytes | None, dist: dict[bytes | None, float] = dist) -> float:
                if c is END or c in dist:
                    return dist.get(c, 0.0)
                return next((dist[c[:n]] for n in range(len(c), 0, -1) if c[:n] in dist), 0.0)

            scores = {c: score(c) for c in candidates}
            total = sum(scores.values())
            for c, v in scores.items():
                mixed[c] += v / total / len(models)
        choice = max(mixed, key=lambda k: mixed[k])
        if choice is END:
            break
        generated += choice
        for m, state, dist in zip(models, states, dists, strict=True):  # who wrote it: see reference_generate
            m.commit(state, choice, partial=dist.get(choice, 0.0) / sum(dist.values()) < 0.5 * mixed[choice])
    return generated.decode("utf-8", errors="replace")


def test_unite_equals_in_process_reference(
    loop: LoopThread, pair: list[WorkerProcess], references: list[ReferenceModel]
) -> None:
    # top_k above the vocabularies: every entry is a candidate, so the reference needs no top-k tie rules.
    config = {"strategy": "unite", "unite": {"top_k": 1000}}
    served = _generate(loop, pair, PROMPTS, config=config, max_new_tokens=8)
    assert _texts(served) == [_unite_reference(references, p, 8) for p in PROMPTS]
    gac = _generate(loop, pair, PROMPTS, config={"strategy": "gac"}, max_new_tokens=8)
    assert _texts(served) != _texts(gac)  # first-token scores for foreign tokens do change the vote


def test_unite_twins_equal_the_single_model(
    loop: LoopThread, default_workers: dict[str, WorkerProcess], twin: WorkerProcess
) -> None:
    bpe = default_workers["arith-bpe"]
    alone = _generate(loop, [bpe], PROMPTS, max_new_tokens=8)
    twins = _generate(loop, [bpe, twin], PROMPTS, config={"strategy": "unite"}, max_new_tokens=8)
    assert _texts(twins) == _texts(alone)
    assert all(r.usage.steps_ensembled == r.usage.steps for r in twins)


def test_lookup_scores_a_candidates_first_token(
    loop: LoopThread, default_workers: dict[str, WorkerProcess], references: list[ReferenceModel]
) -> None:
    """The worker's lookup: the longest next-bytes option that is a prefix of each candidate."""
    prompt, committed = "12+35=", b"4"  # arith-bpe has two-digit tokens: "4" is healed
    candidates = [b"7", b"78", b"7x", b"4", b"x", b"", b"\xff"]

    async def run() -> list[float]:
        client = WorkerClient(default_workers["arith-bpe"].address)  # channels belong to the loop's thread
        session = client.session(30)
        try:
            await session.open(Prompt(text=prompt), "lookup-test")
            await session.step(committed, Transport(top_k=5, half=False))
            return list(await session.lookup(candidates))
        finally:
            session.cancel()
            await client.close()

    got = loop.run(run())
    state = references[0].start(prompt)
    references[0].commit(state, committed)
    expected_dist = references[0].next_bytes(state)
    for candidate, value in zip(candidates, got, strict=True):
        key = (
            END
            if not candidate
            else next((candidate[:n] for n in range(len(candidate), 0, -1) if candidate[:n] in expected_dist), None)
        )
        if key is None and candidate:
            assert value == -math.inf, candidate
        else:
            assert value == pytest.approx(math.log(expected_dist[key]), abs=1e-4), candidate


# --------------------------------------------------------------------------- safe


def test_safe_with_twins_never_ensembles_and_equals_the_drafter(
    loop: LoopThread, default_workers: dict[str, WorkerProcess], twin: WorkerProcess
) -> None:
    bpe = default_workers["arith-bpe"]
    alone = _generate(loop, [bpe], PROMPTS, config={"strategy": "safe"}, max_new_tokens=10)
    twins = _generate(loop, [bpe, twin], PROMPTS, config={"strategy": "safe"}, max_new_tokens=10)
    assert _texts(twins) == _texts(alone)
    assert _texts(alone)[1:3] == ["75", "93"]
    for r in twins:
        assert r.usage.steps_ensembled == 0
        # A request starts in lockstep (a pass of each model per position) until four positions agreed;
        # then the verifier runs once per draft of up to 5 tokens, not once per token.
        assert r.usage.models[1].forward_passes <= 4 + math.ceil((r.usage.steps - 4) / 5)


def test_safe_ensembles_only_where_models_disagree(loop: LoopThread, pair: list[WorkerProcess]) -> None:
    for ensemble in ("gac", "unite"):
        config = {"strategy": "safe", "safe": {"ensemble": ensemble, "sharpen": ensemble == "unite"}}
        results = _generate(loop, pair, PROMPTS, config=config, max_new_tokens=16)
        assert sum(r.usage.steps_ensembled for r in results) > 0  # these two models do disagree
        assert sum(r.usage.steps_ensembled for r in results) < sum(r.usage.steps for r in results)
        for r in results[:5]:
            assert r.text.isdigit(), r.text  # still sums: rolled-back drafts leave no trace
    # Greedy SAFE is deterministic, and equal whatever the batch around it.
    again = _generate(loop, pair, PROMPTS, config={"strategy": "safe"}, max_new_tokens=16)
    first = _generate(loop, pair, PROMPTS, config={"strategy": "safe"}, max_new_tokens=16)
    assert _texts(again) == _texts(first)


def test_safe_in_lockstep_costs_a_gac_step_per_position_and_writes_what_gac_writes(
    loop: LoopThread, pair: list[WorkerProcess]
) -> None:
    """With drafts of one token at most, adaptive SAFE never drafts: each position asks both models at
    once, as GaC does. Greedy, with equal weights, it then decides every position as GaC does (the
    drafter's token where the verifier agrees is GaC's argmax too), at the same forward passes per model;
    a one-token draft instead runs the drafter, then the verifier, in sequence."""
    gac = _generate(loop, pair, PROMPTS, config={"strategy": "gac"}, max_new_tokens=12)
    config = {"strategy": "safe", "safe": {"draft_tokens": 1}}
    lockstep = _generate(loop, pair, PROMPTS, config=config, max_new_tokens=12)
    assert _texts(lockstep) == _texts(gac)
    for s, g in zip(lockstep, gac, strict=True):
        assert s.usage.steps == g.usage.steps
        assert [m.forward_passes for m in s.usage.models] == [m.forward_passes for m in g.usage.models]
        assert s.usage.steps_ensembled <= g.usage.steps_ensembled  # where the models agree, nothing is mixed
    assert 0 < sum(r.usage.steps_ensembled for r in lockstep) < sum(r.usage.steps_ensembled for r in gac)


# --------------------------------------------------------------------------- chared


def _chared_reference(models: list[ReferenceModel], prompt: str, max_new: int) -> str:
    """Greedy character-wise ensemble from exact next-bytes distributions, equal weights: a model's
    distribution is narrowed to the chosen character, and asked afresh (sent the characters chosen
    since) when some of its mass ends exactly at the character or none goes on past it."""
    from coordinator.union_vocab import first_char

    generated = b""
    states = [m.start(prompt) for m in models]
    tables: list[dict[bytes | None, float] | None] = [None] * len(models)
    unsent = [b""] * len(models)
    for _ in range(max_new):
        votes: dict[bytes | None, float] = {}
        for i, (model, state) in enumerate(zip(models, states, strict=True)):
            if tables[i] is None:
                model.commit(state, unsent[i], partial=True)
                unsent[i], tables[i] = b"", model.next_bytes(state)
            table = tables[i]
            assert table is not None
            total = sum(table.values())
            for key, p in table.items():
                char = END if key is END else first_char(key)
                votes[char] = votes.get(char, 0.0) + p / total / len(models)
        choice = max(votes, key=lambda k: votes[k])
        if choice is END:
            break
        generated += choice
        for i, table in enumerate(tables):
            assert table is not None
            unsent[i] += choice
            rest = {
                k[len(choice) :]: p
                for k, p in table.items()
                if k is not END and len(k) > len(choice) and k.startswith(choice)
            }
            ended = any(k is not END and k and choice.startswith(k) for k in table)
            tables[i] = None if ended or not rest else rest
    return generated.decode("utf-8", errors="replace")


def test_chared_exact_equals_reference(
    loop: LoopThread, pair: list[WorkerProcess], references: list[ReferenceModel]
) -> None:
    config = {"strategy": "chared", "chared": {"requery_mass": 0.0}}
    served = _generate(loop, pair, PROMPTS, config=config, max_new_tokens=8)
    assert _texts(served) == [_chared_reference(references, p, 8) for p in PROMPTS]


def test_chared_asks_models_again_only_when_needed(loop: LoopThread, pair: list[WorkerProcess]) -> None:
    results = _generate(loop, pair, PROMPTS[:5], config={"strategy": "chared"}, max_new_tokens=8)
    asked = sum(m.forward_passes for r in results for m in r.usage.models)
    assert asked < sum(r.usage.steps for r in results) * 2  # fewer than every model at every step
    assert sum(r.text.isdigit() for r in results) >= 4


def test_strategy_settings_are_validated() -> None:
    base = {"models": [{"name": "a", "path": str(MODELS / "arith-bpe")}]}
    with pytest.raises(ValueError, match=r"safe\.drafter"):
        parse_config({**base, "safe": {"drafter": "nope"}}, ROOT)
    with pytest.raises(ValueError, match=r"unite\.top_k"):
        parse_config({**base, "unite": {"top_k": 0}}, ROOT)
    with pytest.raises(ValueError, match=r"chared\.requery_mass"):
        parse_config({**base, "chared": {"requery_mass": 2}}, ROOT)
