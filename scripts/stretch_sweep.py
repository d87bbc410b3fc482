"""How the worker's `--decode-stretch` default was chosen (docs/bench-cpu.md, "`--decode-stretch` on by default"):
the engine's bursts on the real SmolLM2 at each setting, and ME / GaC at saturation with every worker at it.

    python scripts/stretch_sweep.py 0,1.5,2          # engine: 16 x 1,536 burst, 16 x 512 writing 64, 8 x 512
    python scripts/stretch_sweep.py 0,2 --me         # ME / GaC tokens/s at 32 streams, K=2 and 3 (bench.py's figure)

Each setting runs on fresh runtimes (workers), one after the other in one process; one thread each.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def engine(stretches: list[float]) -> None:
    import bench_engine
    import torch

    from model_worker import catalog
    from model_worker.loading import load_model
    from model_worker.runtime import Runtime

    torch.set_num_threads(1)
    loaded = load_model(str(catalog.prepare("smollm2-135m-instruct", log=False)), max_model_len=4096)
    for s in stretches:
        long = bench_engine.burst(Runtime(loaded, decode_stretch=s), 1536, streams=16)
        writes = bench_engine.burst(Runtime(loaded, decode_stretch=s), 512, 16, 64)
        small = bench_engine.burst(Runtime(loaded, decode_stretch=s), 512, streams=8)
        print(
            f"--decode-stretch {s:g}: 16 x 1536 burst {long['burst_ratio']:.2f}x / {long['steady_ratio']:.2f}x, "
            f"first token p50 {long['ttft_p50_s']:.1f} s, last token {long['last_token_max_s']:.1f} s | "
            f"16 x 512 writing 64: last token {writes['last_token_max_s']:.1f} s, gap {writes['burst_ratio']:.2f}x | "
            f"8 x 512 burst {small['burst_ratio']:.2f}x / {small['steady_ratio']:.2f}x",
            flush=True,
        )


async def me(stretches: list[float], rounds: int, tokens: int) -> None:
    for s in stretches:
        for f in await _me_at(s, rounds, tokens):
            print(f"--decode-stretch {s:g}: {f.name} {f.value:.2f}x {f.details}", flush=True)


async def _me_at(stretch: float, rounds: int, tokens: int) -> list:
    """bench.py's ME figure with every worker (two, then a third) at this stretch."""
    import bench

    options = {"decode_stretch": stretch}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = bench.build_models(root)
        workers = [bench.spawn(paths[n], n, options) for n in ("llama-sp", "gpt2-bpe")]

        async def third() -> bench.Worker:
            shutil.copytree(paths["llama-sp"], root / "llama-sp-b")
            workers.append(bench.spawn(root / "llama-sp-b", "llama-sp-b", options))
            return workers[-1]

        try:
            return await bench.figure_me(workers[:2], third, rounds, tokens)
        finally:
            for w in workers:
                w.process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stretches", help="comma-separated --decode-stretch values, e.g. 0,1.5,2")
    parser.add_argument("--me", action="store_true", help="ME / GaC at saturation instead of the engine's bursts")
    parser.add_argument("--rounds", type=int, default=2, help="--me: rounds per strategy (bench.py's full run: 2)")
    parser.add_argument("--tokens", type=int, default=16, help="--me: tokens per stream (bench.py's full run: 16)")
    args = parser.parse_args()
    stretches = [float(x) for x in args.stretches.split(",")]
    if args.me:
        asyncio.run(me(stretches, args.rounds, args.tokens))
    else:
        engine(stretches)


if __name__ == "__main__":
    main()
