"""Run one worker process: `chorus worker --model PATH` (what the worker container runs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face model directory or hub id")
    parser.add_argument("--name", help="model name (default: the directory name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument("--max-memory", type=json.loads, help='accelerate max_memory, e.g. \'{"0": "24GiB"}\'')
    parser.add_argument("--port-file", help="write the bound port here once serving (for supervisors)")


async def run(args: argparse.Namespace) -> None:
    from model_worker.loading import load_model
    from model_worker.runtime import Runtime
    from model_worker.server import serve

    loaded = load_model(args.model, name=args.name, device=args.device, dtype=args.dtype, max_memory=args.max_memory)
    runtime = Runtime(loaded)
    server, port, _ = await serve(runtime, f"{args.host}:{args.port}")
    if args.port_file:
        with open(args.port_file, "w") as fh:
            fh.write(str(port))
    print(f"worker {loaded.name} serving on {args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=5)
    await runtime.batcher.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chorus worker", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(parser.parse_args(argv)))
