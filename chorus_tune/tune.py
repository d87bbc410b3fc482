"""The tuning procedure: measure each member and each candidate on the dev split, pick the best (the best
member alone is a candidate, so the pick is never below it on dev), and measure the pick, the untuned
ensemble and every member on the held-out test split, with paired bootstrap intervals against the member
that was best on dev. Nothing is fitted or chosen on the test split."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from chorus_tune import bootstrap, measure, search
from chorus_tune.calibration import TEMPERATURES, fit_temperature, log_likelihood
from chorus_tune.items import Item, split
from coordinator.config import EnsembleConfig, load_config
from coordinator.strategies import SECTIONS


@dataclass(frozen=True)
class Options:
    dev_fraction: float = 0.5
    seed: int = 0
    concurrency: int = 8
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    finalists: int = 1  # candidates per strategy run for real on dev, the best by the first-step estimate


@dataclass
class Row:
    label: str
    correct: list[bool]
    versus_best: bootstrap.Interval | None = None

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else 0.0


@dataclass
class Report:
    members: list[str]
    dev_items: int
    test_items: int
    temperatures: list[float]  # fitted, per member
    dev: list[Row] = field(default_factory=list)
    test: list[Row] = field(default_factory=list)
    chosen: str = ""
    best_member: str = ""
    seconds: float = 0.0

    def table(self) -> str:
        lines = [
            f"held-out test split: {self.test_items} items (dev: {self.dev_items}); "
            f"intervals: paired bootstrap 95% vs {self.best_member} alone (the best member on dev)",
            "| run | dev accuracy | test accuracy | test vs best member |",
            "| --- | --- | --- | --- |",
        ]
        dev = {r.label: r for r in self.dev}
        for row in self.test:
            d = dev.get(row.label)
            dev_cell = f"{d.accuracy:.1%}" if d else "-"
            versus = str(row.versus_best) if row.versus_best is not None else "-"
            test_cell = f"{row.accuracy:.1%} ({sum(row.correct)}/{len(row.correct)})"
            lines.append(f"| {row.label} | {dev_cell} | {test_cell} | {versus} |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        def rows(rs: list[Row]) -> list[dict[str, Any]]:
            return [
                {
                    "run": r.label,
                    "accuracy": r.accuracy,
                    "correct": sum(r.correct),
                    "items": len(r.correct),
                    "versus_best": None if r.versus_best is None else vars(r.versus_best),
                }
                for r in rs
            ]

        return {
            "members": self.members,
            "dev_items": self.dev_items,
            "test_items": self.test_items,
            "temperatures": self.temperatures,
            "chosen": self.chosen,
            "best_member": self.best_member,
            "seconds": round(self.seconds, 1),
            "dev": rows(self.dev),
            "test": rows(self.test),
            "markdown": self.table(),
        }


def variant(config: EnsembleConfig, candidate: search.Candidate) -> EnsembleConfig:
    """The config with the candidate's strategy, weights (as scores), temperatures and primary."""
    models = tuple(
        spec.model_copy(
            update={
                "temperature": round(float(TEMPERATURES[t]), 4),
                "score": round(w, 4),
                "priority": "primary" if i == candidate.primary else "supportive",
            }
        )
        for i, (spec, t, w) in enumerate(zip(config.models, candidate.temperatures, candidate.weights, strict=True))
    )
    update: dict[str, Any] = {
        "models": models,
        "strategy": candidate.strategy,
        "weights": "score",
        "threshold": candidate.threshold,
    }
    if candidate.strategy == "unite":
        update["unite"] = config.unite.model_copy(update={"top_k": candidate.top_k})
    return config.model_copy(update=update)


async def tune(
    config: EnsembleConfig,
    addresses: list[str],
    items: Sequence[Item],
    options: Options,
    say: Callable[[str], None] = print,
) -> tuple[EnsembleConfig, Report]:
    """(the tuned config, the report)."""
    started = time.perf_counter()
    names = list(config.model_names)
    n = len(names)
    dev, test = split(items, options.dev_fraction, options.seed)
    say(f"{len(items)} items: {len(dev)} dev, {len(test)} test (seed {options.seed})")

    async def run(cfg: EnsembleConfig, addrs: list[str], part: list[Item]) -> list[bool]:
        return await measure.outcomes(cfg, addrs, part, options.max_new_tokens, options.concurrency, options.stop)

    steps, golds = await measure.first_steps(config, addresses, dev, options.concurrency)
    fitted = [fit_temperature([s[m] for s in steps]) for m in range(n)]
    for m, name in enumerate(names):
        ll = log_likelihood([s[m] for s in steps])
        say(
            f"  {name}: temperature {TEMPERATURES[fitted[m]]:.2f} (gold first-step log-likelihood "
            f"{ll[fitted[m]]:.3f}, at 1: {ll[search.ONE]:.3f})"
        )
    report = Report(names, len(dev), len(test), [round(float(TEMPERATURES[t]), 4) for t in fitted])

    # Each member alone, then the ensemble as configured.
    configs: dict[str, tuple[EnsembleConfig, list[str]]] = {}
    for m, name in enumerate(names):
        configs[f"{name} alone"] = (config.alone(name), [addresses[m]])
    configs[f"untuned ({config.strategy})"] = (config, addresses)
    for label, (cfg, addrs) in configs.items():
        report.dev.append(Row(label, await run(cfg, addrs, dev)))
        say(f"  dev {label}: {report.dev[-1].accuracy:.1%}")
    best = max(range(n), key=lambda m: report.dev[m].accuracy)
    report.best_member = names[best]

    # Candidates, filtered by their first-step accuracy; the finalists run for real.
    pool = search.candidates(n, fitted, best) if n > 1 else []
    scored = [(search.first_step_accuracy(c, steps, golds), i, c) for i, c in enumerate(pool)]
    for strategy in dict.fromkeys(c.strategy for c in pool):
        ranked = sorted((s for s in scored if s[2].strategy == strategy), key=lambda s: (-s[0], s[1]))
        for estimate, _, candidate in ranked[: options.finalists]:
            label = candidate.describe(names)
            cfg = variant(config, candidate)
            configs[label] = (cfg, addresses)
            report.dev.append(Row(label, await run(cfg, addresses, dev)))
            say(f"  dev {label}: {report.dev[-1].accuracy:.1%} (first step estimate {estimate:.1%})")

    # The pick: the best on dev; ties go to the earliest row, the best member alone before any ensemble.
    order = [best] + [i for i in range(len(report.dev)) if i != best]
    chosen = max(order, key=lambda i: report.dev[i].accuracy)
    report.chosen = report.dev[chosen].label
    tuned_config = configs[report.chosen][0]
    say(f"chosen on dev: {report.chosen}")

    # The held-out split: every member, the untuned ensemble, and the pick (once, if it is one of them).
    test_labels = list(
        dict.fromkeys([*(f"{name} alone" for name in names), f"untuned ({config.strategy})", report.chosen])
    )
    for label in test_labels:
        cfg, addrs = configs[label]
        report.test.append(Row((f"tuned = {label}" if label == report.chosen else label), await run(cfg, addrs, test)))
    reference = report.test[best].correct
    for row in report.test:
        row.versus_best = bootstrap.paired(row.correct, reference, seed=options.seed)
    for row in report.dev:
        row.versus_best = bootstrap.paired(row.correct, report.dev[best].correct, seed=options.seed)
    report.dev = [
        r if r.label != report.chosen else Row(f"tuned = {r.label}", r.correct, r.versus_best) for r in report.dev
    ]
    report.seconds = time.perf_counter() - started
    return tuned_config, report


def write_config(original: EnsembleConfig, tuned: EnsembleConfig, path: Path, report: Report) -> None:
    """Write the original config (as loaded, before any CPU adjustment) with what tuning chose: the
    strategy, weights, threshold and each kept member's temperature, score and priority (native format,
    non-default keys); check it loads."""
    by_name = {m.name: m for m in original.models}
    keep = ("temperature", "score", "priority")
    models = tuple(by_name[m.name].model_copy(update={k: getattr(m, k) for k in keep}) for m in tuned.models)
    # One member kept (the best alone): its strategy sections as `alone` made them (no other drafter);
    # unite picked: its union top-k.
    sections = {} if len(models) == len(original.models) else {s: getattr(tuned, s) for s in SECTIONS}
    if tuned.strategy == "unite":
        sections["unite"] = original.unite.model_copy(update={"top_k": tuned.unite.top_k})
    update = {"models": models, "strategy": tuned.strategy, "weights": tuned.weights, "threshold": tuned.threshold}
    config = original.model_copy(update={**update, **sections})
    data = config.model_dump(mode="json", exclude_defaults=True)
    data["models"] = [m.model_dump(mode="json", exclude_defaults=True) for m in config.models]
    header = [
        "# Written by `chorus tune`; chosen on the dev split: " + report.chosen,
        f"# held-out test: {report.test_items} items, versus {report.best_member} alone (paired bootstrap 95%):",
        *(f"#   {r.label}: {r.accuracy:.1%}, {r.versus_best}" for r in report.test),
    ]
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    load_config(path)  # raises ConfigError if the coordinator would not accept it
