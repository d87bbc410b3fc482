"""Does the worker's engine compute what transformers computes, in a given dtype? Per prompt: greedy tokens
against transformers' own `generate` on the same loaded model, and the largest difference between the two
logit rows at each step (while they agree). In a dtype other than float32, also how far each of the two is
from the float32 model: the KL divergence of its first next-token distribution from float32's (median over
the prompts), since there the two round differently and neither is the float32 model. And what each dtype
costs here: plain forwards of 1 and 16 sequences and of a 256-token prompt.

    python scripts/dtype_agreement.py [--models smollm2-135m-instruct gemma3-270m] [--dtypes float32 bfloat16]
                                      [--gpu-form]

Real models from the catalog (`make real-models`), one CPU thread, 24 tokens per prompt, the worker's own
defaults (prefill chunks of 256 tokens). The tests hold the float32 engine to `generate` token for token
(`tests/test_real_models.py`); this shows where that holds in other dtypes (README, "Conditioning").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_worker import catalog  # noqa: E402
from model_worker.kv_manager import SessionKV  # noqa: E402
from model_worker.loading import load_model  # noqa: E402
from model_worker.runtime import Runtime  # noqa: E402
from tests.real_models import EVERYDAY, document  # noqa: E402

PROMPTS = [
    *EVERYDAY.values(),
    "Here is a short recipe for pancakes:",
    "The quick brown fox",
    "Once upon a time,",
    "In 1905, Albert Einstein",
    document(),
]
TOKENS = 24


@dataclass
class Row:
    tail: str  # the prompt's end
    first: int | None  # the first step where the greedy tokens differ, None if none does
    worst: float  # the largest logit difference over the steps before it
    first_rows: tuple[torch.Tensor, torch.Tensor]  # the engine's and transformers' logits at the first step


async def compare(name: str, dtype: str, gpu_form: bool = False) -> tuple[list[Row], str]:
    """Per prompt, the engine against `generate`; and the dtype's forward times. `gpu_form`: the passes a GPU
    worker runs (short feeds in the static form, every decode gathered), here eagerly."""
    loaded = load_model(f"catalog:{name}", dtype=dtype, max_model_len=2048)
    runtime = Runtime(loaded, kv_budget_bytes=256 * 2**20, prefix_caching=False)
    engine, model = runtime.engine, loaded.model
    if gpu_form:
        engine.runner.static.enabled = True
        engine.runner.gather_up_to = None
    engine.start()
    out = []
    try:
        for prompt in PROMPTS:
            ids = loaded.tokenizer(prompt).input_ids
            with torch.inference_mode():
                ref = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=TOKENS,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            kv = SessionKV()
            engine.kv.reserve(kv, len(ids) + TOKENS + 1)
            await engine.forward(kv, ids, {len(ids) - 1})
            first, worst = None, 0.0
            first_rows = (kv.rows[len(ids) - 1].double(), ref.logits[0][0].double())
            for step in range(min(TOKENS, len(ref.logits))):
                ours = kv.rows[len(kv.ids) - 1].float()
                theirs = ref.logits[step][0].float()
                worst = max(worst, float((ours - theirs).abs().max()))
                token = int(ours.argmax())
                if token != int(ref.sequences[0, len(ids) + step]):
                    first = step
                    break
                await engine.forward(kv, [token], {len(kv.ids)})
            engine.release(kv)
            out.append(Row(prompt[-24:], first, worst, first_rows))
        times = speed(model)
    finally:
        await engine.stop()
    return out, times


def speed(model: torch.nn.Module) -> str:
    """Median time of a plain forward (no cache): one token of 1 and of 16 sequences, a 256-token prompt."""
    shapes = {"1 x 1 token": (1, 1), "16 x 1 token": (16, 1), "1 x 256 tokens": (1, 256)}
    times = []
    with torch.inference_mode():
        for batch, length in shapes.values():
            ids = torch.randint(0, 1000, (batch, length))
            model(ids)  # warm-up
            took = []
            for _ in range(3):
                started = time.perf_counter()
                model(ids)
                took.append(time.perf_counter() - started)
            times.append(statistics.median(took) * 1e3)
    return ", ".join(f"{k} {t:.0f} ms" for k, t in zip(shapes, times, strict=True))


def kl_from_float32(name: str, rows: list[Row]) -> tuple[float, float]:
    """Median KL(float32 || engine) and KL(float32 || transformers) of the first next-token distributions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = catalog.prepare(name, log=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours, theirs = [], []
    for prompt, row in zip(PROMPTS, rows, strict=True):
        with torch.inference_mode():
            truth = torch.log_softmax(model(torch.tensor([tokenizer(prompt).input_ids])).logits[0, -1].double(), -1)
        for logits, into in zip(row.first_rows, (ours, theirs), strict=True):
            into.append(float((truth.exp() * (truth - torch.log_softmax(logits, -1))).sum()))
    return statistics.median(ours), statistics.median(theirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument(
        "--gpu-form",
        action="store_true",
        help="run the passes a GPU worker runs (short feeds in the static form, every decode gathered), eagerly",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        for dtype in args.dtypes:
            rows, times = asyncio.run(compare(name, dtype, args.gpu_form))
            agree = sum(row.first is None for row in rows)
            form = " (the GPU's passes)" if args.gpu_form else ""
            print(f"{name} {dtype}{form}: {agree}/{len(rows)} prompts agree for {TOKENS} tokens", flush=True)
            for row in rows:
                verdict = "agree" if row.first is None else f"differ at token {row.first}"
                print(f"  {row.tail!r:28} {verdict:18} largest logit difference {row.worst:.4g}", flush=True)
            if dtype != "float32":
                ours, theirs = kl_from_float32(name, rows)
                print(f"  median KL from the float32 model: engine {ours:.2e}, transformers {theirs:.2e}", flush=True)
            print(f"  plain forward (no cache): {times}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
