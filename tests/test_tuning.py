"""chorus tune's parts: temperature fitting, the paired bootstrap, items and their split, the first-step
estimate; and `chorus tune` end to end on the embedded models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from chorus.cli import main
from chorus_tune import bootstrap
from chorus_tune.calibration import ONE, TEMPERATURES, FirstStep, fit_temperature, summarize
from chorus_tune.items import Item, ItemsError, load_jsonl, split
from chorus_tune.measure import forced_whitespace, gold_uids
from chorus_tune.search import Candidate, first_step_correct, weight_grid
from coordinator.config import load_config
from coordinator.union_dist import UnionDist

REPO = Path(__file__).resolve().parent.parent


def _steps(truth_temperature: float, items: int = 1500, vocab: int = 40, seed: int = 0) -> list[FirstStep]:
    """A model reporting softmax(z) on items whose gold token is drawn from softmax(z / truth_temperature)."""
    rng = np.random.default_rng(seed)
    uids = np.arange(1, vocab + 1, dtype=np.int64)
    steps = []
    for _ in range(items):
        z = rng.normal(0, 3, vocab)
        reported = np.exp(z - z.max())
        truth = np.exp(z / truth_temperature - (z / truth_temperature).max())
        gold = rng.choice(uids, p=truth / truth.sum())
        steps.append(summarize(UnionDist(uids, reported / reported.sum()), np.array([gold])))
    return steps


@pytest.mark.parametrize("truth", [0.5, 1.0, 2.0])
def test_fitted_temperature_recovers_the_truth(truth: float) -> None:
    fitted = TEMPERATURES[fit_temperature(_steps(truth))]
    assert truth / 1.25 < fitted < truth * 1.25, fitted


def test_summary_keeps_exact_tempered_probabilities() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(600) * 0.3)
    uids = np.arange(600, dtype=np.int64) * 2 + 5
    step = summarize(UnionDist(uids, probs), np.array([uids[3], uids[7]]), keep=20)
    assert step.uids.size == 20 and step.uids[0] == uids[np.argmax(probs)]
    for t in (0, ONE, len(TEMPERATURES) - 1):
        power = probs ** (1 / TEMPERATURES[t])
        expected = power / power.sum()
        np.testing.assert_allclose(step.tempered(t), expected[np.lexsort((np.arange(600), -probs))[:20]], rtol=1e-9)
        assert step.gold_logprob(t) == pytest.approx(np.log(expected[3] + expected[7]))


def test_paired_bootstrap() -> None:
    rng = np.random.default_rng(0)
    a = list(rng.random(300) < 0.5)
    same = bootstrap.paired(a, a)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero()
    better = [x or (i % 4 == 0) for i, x in enumerate(a)]  # right on every item a was, and some more
    gain = bootstrap.paired(better, a, seed=3)
    assert gain.mean > 0 and gain.excludes_zero() and gain.low <= gain.mean <= gain.high
    assert bootstrap.paired(better, a, seed=3) == gain  # seeded: deterministic
    noise = bootstrap.paired(list(rng.random(300) < 0.5), a)
    assert noise.low < 0 < noise.high
    with pytest.raises(ValueError):
        bootstrap.paired([True], [True, False])


def test_items_split_and_grading(tmp_path: Path) -> None:
    data = tmp_path / "items.jsonl"
    rows = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(9)]
    rows.append({"messages": [{"role": "user", "content": "hi"}], "answer": "hello"})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_jsonl(data)
    assert len(items) == 10 and items[-1].messages == (("user", "hi"),)
    dev, test = split(items, 0.5, seed=7)
    assert (dev, test) == split(items, 0.5, seed=7) and len(dev) == len(test) == 5
    assert sorted(i.answer for i in dev + test) == sorted(i.answer for i in items)
    assert split(items, 0.5, seed=8) != (dev, test)
    item = Item("Paris", prompt="Q")
    assert item.is_correct(" Paris\nQ: next") and not item.is_correct("Paris, France") and not item.is_correct("")
    assert item.gold_continuations() == (b"Paris", b" Paris")
    for line, where in [
        ('{"prompt": "x"}', "answer"),
        ('{"answer": "x"}', "exactly one of prompt or messages"),
        ('{"messages": [], "answer": "x"}', "messages"),
        ("[1]", "expected an object"),
        ("{", "invalid JSON"),
    ]:
        data.write_text('{"prompt": "ok", "answer": "y"}\n' + line + "\n")
        with pytest.raises(ItemsError, match=f"items.jsonl:2: .*{where}"):
            load_jsonl(data)


def test_first_step_estimate_follows_the_strategy() -> None:
    """Two members on one item: the confident one is wrong, the other right; the weights, the temperature
    and the threshold gate decide which one the first step follows."""
    wrong = summarize(UnionDist(np.array([1, 2], dtype=np.int64), np.array([0.7, 0.3])), np.array([2]))
    right = summarize(UnionDist(np.array([1, 2], dtype=np.int64), np.array([0.4, 0.6])), np.array([2]))
    steps, gold = [wrong, right], np.array([2])
    equal, t1 = (0.5, 0.5), (ONE, ONE)
    assert not first_step_correct(Candidate("gac", equal, t1), steps, gold)
    assert first_step_correct(Candidate("gac", (0.2, 0.8), t1), steps, gold)
    hot = int(np.argmin(np.abs(TEMPERATURES - 4.0)))  # the wrong member, flattened, no longer outweighs
    assert first_step_correct(Candidate("gac", equal, (hot, ONE)), steps, gold)
    assert not first_step_correct(Candidate("threshold", (0.2, 0.8), t1, primary=0, threshold=0.6), steps, gold)
    assert first_step_correct(Candidate("threshold", (0.2, 0.8), t1, primary=0, threshold=0.8), steps, gold)
    assert weight_grid(2)[0] == (0.5, 0.5) and all(sum(w) == pytest.approx(1) for w in weight_grid(3))


def test_first_step_estimate_of_unite_votes_among_the_members_top_k() -> None:
    """UniTE's candidates are the members' top-k entries, each member's softmax over them only: entry 2, the
    second choice of both, wins GaC's average, but not a vote among the first choices (1 and 4), where the
    member that has not kept a candidate gives it its smallest kept probability."""
    a = summarize(UnionDist(np.array([1, 2, 3], dtype=np.int64), np.array([0.5, 0.3, 0.2])), np.array([1]))
    b = summarize(UnionDist(np.array([2, 4, 5], dtype=np.int64), np.array([0.35, 0.4, 0.25])), np.array([1]))
    steps, t1, equal = [a, b], (ONE, ONE), (0.5, 0.5)
    assert first_step_correct(Candidate("gac", equal, t1), steps, np.array([2]))
    assert first_step_correct(Candidate("unite", equal, t1, top_k=1), steps, np.array([1]))
    assert first_step_correct(Candidate("unite", equal, t1, top_k=2), steps, np.array([1]))  # 1: .375, 2: .325
    assert first_step_correct(Candidate("unite", (0.2, 0.8), t1, top_k=1), steps, np.array([4]))
    # Members that keep every candidate: at a top-k covering them all, UniTE's vote is GaC's average.
    a = summarize(UnionDist(np.array([1, 2, 4], dtype=np.int64), np.array([0.5, 0.3, 0.2])), np.array([1]))
    b = summarize(UnionDist(np.array([1, 2, 4], dtype=np.int64), np.array([0.1, 0.5, 0.4])), np.array([1]))
    for strategy in ("gac", "unite"):
        assert first_step_correct(Candidate(strategy, equal, t1, top_k=3), [a, b], np.array([2]))  # .3, .4, .3


def test_a_unite_pick_is_written_with_its_top_k(tmp_path: Path) -> None:
    from chorus_tune.tune import Report, variant, write_config

    config = load_config(REPO / "configs" / "default.yaml")
    pick = Candidate("unite", (0.65, 0.35), (ONE, ONE), top_k=5)
    tuned = variant(config, pick)
    assert tuned.strategy == "unite" and tuned.unite.top_k == 5
    out = tmp_path / "tuned.yaml"
    write_config(config, tuned, out, Report(list(config.model_names), 1, 1, [1.0, 1.0], chosen="unite"))
    written = load_config(out)
    assert written.strategy == "unite" and written.unite.top_k == 5
    assert [m.score for m in written.models] == [0.65, 0.35]


class _Union:
    """The part of a union vocabulary the first-step measurement reads."""

    def __init__(self, entries: list[bytes]) -> None:
        self.entries = entries

    def bytes_of(self, uid: int) -> bytes:
        return self.entries[uid]

    def lookup(self, data: bytes) -> int | None:
        return self.entries.index(data) if data in self.entries else None


def test_the_first_step_of_an_answer_is_past_the_whitespace_every_member_writes() -> None:
    """After "4 * 8 =" comes " " then "32" in both members' tokens: the step that only writes the space
    tells nothing, so the one after it is measured, against the gold answer without the space."""
    union = _Union([b" ", b"3", b"32", b" 3", b"\n", b"4"])
    ensemble = type("E", (), {"union": union})()
    item = Item("32", prompt="4 * 8 =")
    space_first = [UnionDist(np.array([0, 3], dtype=np.int64), np.array([0.9, 0.1])) for _ in range(2)]
    assert forced_whitespace(ensemble, space_first, item, b"") == b" "  # type: ignore[arg-type]
    assert forced_whitespace(ensemble, space_first, item, b" ") is None  # "  32" is no gold continuation
    split_tops = [space_first[0], UnionDist(np.array([0, 3], dtype=np.int64), np.array([0.1, 0.9]))]
    assert forced_whitespace(ensemble, split_tops, item, b"") is None  # one member would write " 3": no agreement
    digit_first = [UnionDist(np.array([1, 5], dtype=np.int64), np.array([0.6, 0.4])) for _ in range(2)]
    assert forced_whitespace(ensemble, digit_first, item, b"") is None  # not whitespace: the answer starts here
    newline_first = [UnionDist(np.array([4], dtype=np.int64), np.array([1.0])) for _ in range(2)]
    assert forced_whitespace(ensemble, newline_first, item, b"") is None  # the gold does not go on with "\n"
    assert list(gold_uids(ensemble, item)) == [0, 1, 2, 3]  # type: ignore[arg-type]
    assert list(gold_uids(ensemble, item, b" ")) == [1, 2]  # type: ignore[arg-type]


def test_chorus_tune_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On the embedded arithmetic models: a config the coordinator accepts, never below the best member on
    dev, and a report on the held-out part."""
    data = tmp_path / "sums.jsonl"
    pairs = [(a, b) for a in range(3, 90, 7) for b in (11, 46)][:20]
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a, b in pairs))
    out, report = tmp_path / "tuned.yaml", tmp_path / "report.json"
    args = [
        "--log-level",
        "WARNING",
        "tune",
        "--config",
        str(REPO / "configs" / "default.yaml"),
        "--data",
        str(data),
        "--out",
        str(out),
        "--json",
        str(report),
        "--concurrency",
        "4",
    ]
    assert main(args) == 0
    tuned = load_config(out)
    result = json.loads(report.read_text())
    assert result["dev_items"] == result["test_items"] == 10
    dev = {row["run"].removeprefix("tuned = "): row for row in result["dev"]}
    chosen = next(row for row in result["dev"] if row["run"].startswith("tuned = "))
    best = dev[f"{result['best_member']} alone"]
    assert chosen["accuracy"] >= best["accuracy"] and chosen["accuracy"] == max(r["accuracy"] for r in result["dev"])
    assert len(result["test"]) >= 3 and all(row["items"] == 10 for row in result["test"])
    assert {m.name for m in tuned.models} <= {"arith-bpe", "arith-sp"}
    assert all(0.25 <= t <= 4 for t in result["temperatures"])
    printed = capsys.readouterr().out
    assert "held-out test split: 10 items" in printed and f"wrote {out}" in printed


def test_chorus_tune_refuses_bad_input(tmp_path: Path) -> None:
    config = str(REPO / "configs" / "default.yaml")
    missing = ["tune", "--config", config, "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"none\.jsonl: cannot read"):
        main(missing)
    with pytest.raises(SystemExit, match="unknown task 'nope'; valid: lambada, common_knowledge"):
        main(["tune", "--config", config, "--task", "nope", "--out", str(tmp_path / "o")])


def test_demo_shows_a_tuned_config_next_to_the_members(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = REPO / "models"
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text(
        "# Written by `chorus tune`; chosen on the dev split: threshold\n# held-out test: 90 items\n"
        "strategy: threshold\nweights: score\nthreshold: 0.6\nmodels:\n"
        f"- {{name: arith-bpe, path: {models / 'arith-bpe'}, priority: primary, score: 0.65, temperature: 0.8}}\n"
        f"- {{name: arith-sp, path: {models / 'arith-sp'}, score: 0.35, temperature: 1.2}}\n"
    )
    config = str(REPO / "configs" / "default.yaml")
    assert main(["--log-level", "WARNING", "demo", "--config", config, "--tuned", str(tuned)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "/6 right (" in line]
    assert [row.split()[0] for row in rows] == ["arith-bpe", "arith-sp", "gac", "tuned"]
    assert all("95% interval" in row for row in rows)
    # Then where the tuned config fixed a member's error, where it did not, and what nobody got: every
    # question in exactly one of the three, or right everywhere.
    counts = [int(re.search(rf"^{t} \((\d+)\)", out, re.M).group(1)) for t in _FIX_LINES]  # type: ignore[union-attr]
    assert sum(counts) <= 6
    # Last, what chorus tune measured for the tuned config on its held-out split, from the config's header.
    assert out.rstrip().endswith(
        f"{tuned} says:\n  Written by `chorus tune`; chosen on the dev split: threshold\n  held-out test: 90 items"
    )


_FIX_LINES = ("tuned fixed a member's error", "tuned wrong where a member was right", "every run wrong")


def test_the_demo_says_where_the_tuned_ensemble_fixed_a_member(capsys: pytest.CaptureFixture[str]) -> None:
    from chorus.cli import _print_fixes

    right = {"a": [True, False, True, False], "b": [False, False, True, True], "tuned": [True, False, False, True]}
    _print_fixes(["q0", "q1", "q2", "q3"], ["a", "b"], right)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "tuned fixed a member's error (2): q0; q3",
        "tuned wrong where a member was right (1): q2",
        "every run wrong (1): q1",
    ]


def test_the_demos_knowledge_questions_are_held_out_by_the_bench_that_tunes_its_config() -> None:
    """`make run` shows configs/real-tuned.yaml, copied from `make bench-quality-real`'s common-knowledge pick:
    its questions must come from the split that command holds out (same items, dev fraction and seed)."""
    from chorus.cli import KNOWLEDGE_DEV_FRACTION

    recipe = (REPO / "Makefile").read_text().split("\nbench-quality-real:", 1)[1].split("\n\n", 1)[0]
    command = next(line for line in recipe.replace("\\\n", " ").splitlines() if "--task common_knowledge" in line)
    assert "--limit" not in command  # every item, as the demo loads them
    assert f"--dev-fraction {KNOWLEDGE_DEV_FRACTION}" in command
    assert "--seed" not in command  # the default, 0, as the demo splits
    # and the shipped pick is that command's (1,037 items, a quarter dev: 778 held out)
    assert "held-out test: 778 items" in (REPO / "configs" / "real-tuned.yaml").read_text()
