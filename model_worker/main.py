"""Run one worker process: `chorus worker --model PATH` (what the worker container runs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

from chorus_common import logs
from chorus_common.lifecycle import serve_metrics, wait_for_signal
from chorus_common.security import TlsFiles

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face model directory or hub id")
    parser.add_argument("--name", help="model name (default: the directory name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument("--max-memory", type=json.loads, help='accelerate max_memory, e.g. \'{"0": "24GiB"}\'')
    parser.add_argument(
        "--quantization", choices=("none", "8bit", "4bit"), default="none",
        help="load the weights quantized with bitsandbytes (needs CUDA); a GGUF file is another way",
    )  # fmt: skip
    parser.add_argument(
        "--max-sessions", type=int, default=64, help="sessions held at once: KV-cache slots (new ones wait past it)"
    )
    parser.add_argument(
        "--max-model-len", type=int, default=0, help="tokens a session may hold, prompt included (0 = the model's)"
    )
    parser.add_argument(
        "--kv-budget-mib", type=float, default=0.0, help="KV-cache memory budget: caps the slots (0 = no cap)"
    )
    parser.add_argument(
        "--kv-wait", type=float, default=5.0, help="seconds a new session waits for a slot before RESOURCE_EXHAUSTED"
    )
    parser.add_argument(
        "--prefill-chunk", type=int, default=256, help="prompt tokens per forward pass (decodes run between chunks)"
    )
    parser.add_argument("--session-ttl", type=float, default=600.0, help="reclaim sessions idle this many seconds")
    parser.add_argument("--tls-cert", type=Path, help="serve TLS with this PEM certificate (and --tls-key)")
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument(
        "--tls-ca", type=Path, help="require clients (the coordinator) to present a cert this CA signed"
    )
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0 = any free one)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds in-flight sessions get on SIGTERM")
    parser.add_argument("--port-file", help="write the bound port here once serving (for supervisors)")


async def run(args: argparse.Namespace) -> None:
    from model_worker.loading import load_model  # torch only where a model runs
    from model_worker.runtime import Runtime
    from model_worker.server import WorkerServer

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("--tls-cert and --tls-key go together")
        tls = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    server = WorkerServer(f"{args.host}:{args.port}", session_ttl=args.session_ttl, tls=tls)
    await server.start()  # health answers NOT_SERVING while the model loads
    if args.metrics_port is not None:
        log.info("metrics on port %d", serve_metrics(args.host, args.metrics_port))
    log.info("loading %s (port %d)", args.model, server.port)
    loaded = await asyncio.to_thread(
        load_model, args.model, name=args.name, device=args.device, dtype=args.dtype, max_memory=args.max_memory,
        max_model_len=args.max_model_len, quantization=args.quantization,
    )  # fmt: skip
    budget = int(args.kv_budget_mib * 2**20)
    runtime = Runtime(loaded, max_sessions=args.max_sessions, kv_budget_bytes=budget, kv_wait_s=args.kv_wait,
                      prefill_chunk=args.prefill_chunk)  # fmt: skip
    await asyncio.to_thread(runtime.engine.warm_up)
    await server.ready(runtime)
    if args.port_file:
        with open(args.port_file, "w") as fh:
            fh.write(str(server.port))
    print(f"worker {loaded.name} serving on {args.host}:{server.port}", flush=True)
    await wait_for_signal()
    await server.stop(grace=args.grace)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chorus worker", description=__doc__)
    add_arguments(parser)
    logs.configure()
    asyncio.run(run(parser.parse_args(argv)))
