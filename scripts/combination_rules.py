"""Combination rules beyond a fixed average, checked on a real task's dev split before any is built
(issue 21, item 2). Nothing here touches a test split.

    python scripts/combination_rules.py --task common_knowledge|lambada [--limit 500] [--config configs/real.yaml]

1. Weights from each member's confidence at each step (entropy or top probability scaling a fixed
   weight, as confidence-weighted token ensembles do). The members' first-step distributions of every
   dev item are measured through the workers (`chorus_tune.measure.first_steps`, as `chorus tune` does);
   printed: the first-step accuracy of the mixture under fixed weights and under each confidence rule
   (on these tasks the first step is the answer's first word).
2. PackLLM-sim (Mavromatis et al. 2024, "Pack of LLMs: Model Fusion at Test-Time via Perplexity
   Optimization"): weights from each member's perplexity of the prompt. Checked here as its premise: on
   the dev items where exactly one member answers right (each alone, greedy, through the workers), does
   the member with the lower per-byte perplexity of the prompt (computed with transformers from the
   members' model files) tend to be that one? Printed: the AUC of the perplexity difference for
   "member 0 is the right one", and the accuracy of answering with the member of lower perplexity (by
   margin) against each member alone.

A rule worth building shows a gain here first; `make bench-quality-real` then decides whether it stays.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chorus_local import cluster  # noqa: E402
from chorus_tune import measure, tasks  # noqa: E402
from chorus_tune.calibration import ONE, FirstStep  # noqa: E402
from chorus_tune.items import Item, split  # noqa: E402
from coordinator.config import EnsembleConfig, cpu_adjusted, load_config  # noqa: E402

Weights = Callable[[Sequence[FirstStep]], np.ndarray]


def mixture_top(steps: Sequence[FirstStep], weights: np.ndarray) -> int:
    uids = np.concatenate([s.uids for s in steps])
    probs = np.concatenate([s.tempered(ONE) * w for s, w in zip(steps, weights, strict=True)])
    unique, inverse = np.unique(uids, return_inverse=True)
    return int(unique[np.argmax(np.bincount(inverse, weights=probs, minlength=unique.size))])


def entropy(step: FirstStep) -> float:
    p = step.tempered(ONE)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())  # over the kept top entries


def confidence_rules(n: int) -> dict[str, Weights]:
    rules: dict[str, Weights] = {}
    for share in (0.5, 0.65, 0.8, 0.2, 0.35):
        base = np.array([share] + [(1 - share) / (n - 1)] * (n - 1))
        rules[f"fixed, member 0 at {share:g}"] = lambda s, b=base: b
        for tau in (0.5, 1.0, 2.0):
            rules[f"entropy (tau {tau:g}), member 0 at {share:g}"] = lambda s, b=base, t=tau: (
                b * np.exp(-np.array([entropy(x) for x in s]) / t)
            )
        for power in (1, 2):
            rules[f"top probability ^{power}, member 0 at {share:g}"] = lambda s, b=base, k=power: (
                b * (np.array([float(x.tempered(ONE).max()) for x in s]) ** k)
            )
    return rules


def prompt_nats_per_byte(config: EnsembleConfig, items: Sequence[Item]) -> np.ndarray:
    """[item, member]: each member's log-likelihood of the prompt's tokens after its first one, over the
    whole prompt's bytes (the first token, unscored, is a BOS for Gemma and a text token for SmolLM2: its
    bytes stay in the denominator)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_worker.catalog import resolve

    torch.set_num_threads(1)
    out = np.zeros((len(items), len(config.models)))
    for m, spec in enumerate(config.models):
        path = resolve(str(spec.path))
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for i, item in enumerate(items):
            assert item.prompt is not None, "PackLLM's check reads plain prompts"
            ids = tokenizer(item.prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            scored = logp.gather(1, ids[0, 1:, None]).sum().item()
            out[i, m] = scored / len(item.prompt.encode())
    return out


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    pairs = [(p > q) + 0.5 * (p == q) for p in positive for q in negative]
    return float(np.mean(pairs)) if pairs else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="a real task of scripts/real_tasks.py")
    parser.add_argument("--limit", type=int, default=500, help="items, of which the dev half is read")
    parser.add_argument("--config", default=str(ROOT / "configs" / "real.yaml"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--skip-packllm", action="store_true", help="only the confidence rules (no model loads)")
    args = parser.parse_args()
    task = tasks.load(args.task, args.limit)
    dev, _ = split(task.items)
    config, _ = cpu_adjusted(load_config(args.config), False)
    names = config.model_names
    with cluster.local_workers(config) as addresses:
        steps, golds = asyncio.run(measure.first_steps(config, addresses, dev, args.concurrency))
        right = [
            asyncio.run(
                measure.outcomes(
                    config.alone(name), [addresses[m]], dev, task.max_new_tokens, args.concurrency, task.stop
                )
            )
            for m, name in enumerate(names)
        ]
    print(f"{task.name}: {len(dev)} dev items; members {', '.join(names)}")
    for m, name in enumerate(names):
        first = np.mean([np.isin(int(s[m].uids[0]), g) for s, g in zip(steps, golds, strict=True)])
        print(f"  {name} alone: answers {np.mean(right[m]):.1%}, first step {first:.1%}")
    print("\n| rule | first-step accuracy |\n| --- | --- |")
    for label, rule in confidence_rules(len(names)).items():
        hits = [np.isin(mixture_top(s, rule(s)), g) for s, g in zip(steps, golds, strict=True)]
        print(f"| {label} | {np.mean(hits):.1%} |")
    if args.skip_packllm or len(names) != 2:
        return 0
    nats = prompt_nats_per_byte(config, dev)
    margin = nats[:, 0] - nats[:, 1]  # > 0: member 0 finds the prompt likelier
    only0 = [margin[i] for i in range(len(dev)) if right[0][i] and not right[1][i]]
    only1 = [margin[i] for i in range(len(dev)) if right[1][i] and not right[0][i]]
    print(
        f"\nPackLLM premise: {len(only0)} items only {names[0]} answers right, {len(only1)} only {names[1]}; "
        f"AUC of the per-byte log-likelihood margin for '{names[0]} is the right one': {auc(only0, only1):.3f}"
    )
    print("| answer with member 0 when its margin exceeds | accuracy |\n| --- | --- |")
    for cut in np.quantile(margin, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]):
        pick = [right[0][i] if margin[i] >= cut else right[1][i] for i in range(len(dev))]
        print(f"| {cut:+.4f} nats/byte | {np.mean(pick):.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
