"""Run one worker process: `chorus worker --model PATH` (what the worker container runs)."""

from __future__ import annotations

import asyncio
import logging

from chorus_common import allocator, logs
from chorus_common.lifecycle import serve_metrics, wait_for_signal
from chorus_common.security import TlsFiles
from chorus_common.worker_args import WorkerArgs

log = logging.getLogger(__name__)


class LoadFailed(Exception):
    """The model did not load: the worker exits with this one line (the traceback at debug level)."""

    def __init__(self, model: str, cause: BaseException) -> None:
        if isinstance(cause, PermissionError) and cause.filename is None:
            why = str(cause)  # our own (WeightsUnreadable): it names the file, the uid and the fix
        elif isinstance(cause, OSError) and cause.filename is not None:
            why = f"{type(cause).__name__}: {cause.strerror or cause}: {cause.filename}"
        else:
            why = f"{type(cause).__name__}: {cause}"
        super().__init__(f"cannot load model {model}: {why}")


async def run(args: WorkerArgs) -> None:
    from model_worker.loading import load_model  # torch only where a model runs
    from model_worker.server import WorkerServer

    tls = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca) if args.tls_cert and args.tls_key else None
    server = WorkerServer(f"{args.host}:{args.port}", session_ttl=args.session_ttl, tls=tls)
    await server.start()  # health answers NOT_SERVING while the model loads
    if args.metrics_port is not None:
        log.info("metrics on port %d", serve_metrics(args.host, args.metrics_port))
    log.info("loading %s (port %d)", args.model, server.port)
    try:
        loaded = await asyncio.to_thread(
            load_model,
            args.model,
            name=args.name,
            device=args.device,
            dtype=args.dtype,
            max_memory=args.max_memory,
            max_model_len=args.max_model_len,
            quantization=args.quantization,
        )
    except Exception as exc:
        # The server stops on the event loop that runs it (left to the garbage collector after the
        # loop closed, it printed "Event loop is closed" and "never awaited" after the real error).
        await server.stop(grace=0)
        raise LoadFailed(args.model, exc) from exc
    # The modelling code (transformers' and the engine's, ~100 MB of modules) only now: its objects fill the holes
    # the tokenizer's loading left in the heap (it parses its vocabulary and merges into Python objects, then
    # drops them), which would otherwise stay resident beside it (docs/load-test.md, "Worker memory").
    from model_worker.runtime import Runtime

    budget = int(args.kv_budget_mib * 2**20)
    runtime = Runtime(
        loaded,
        max_sessions=args.max_sessions,
        kv_budget_bytes=budget,
        kv_wait_s=args.kv_wait,
        prefill_chunk=args.prefill_chunk,
        max_batched_tokens=args.max_batched_tokens,
        block_size=args.block_size,
        prefix_caching=args.prefix_caching,
        cuda_graphs=args.cuda_graphs,
        decode_stretch=args.decode_stretch,
    )
    await asyncio.to_thread(runtime.engine.warm_up)
    allocator.give_back_free_memory()  # what loading parsed and dropped (tokenizer files, weight buffers)
    await server.ready(runtime)
    if args.port_file:
        with open(args.port_file, "w") as fh:
            fh.write(str(server.port))
    print(f"worker {loaded.name} serving on {args.host}:{server.port}", flush=True)
    await wait_for_signal()
    await server.stop(grace=args.grace)


def serve(args: WorkerArgs) -> None:
    """Run the worker until SIGTERM; a model that fails to load ends it with one line and exit status 1."""
    allocator.fix_mmap_threshold()
    allocator.bound_onednn_caches()  # before torch is imported (in run)
    allocator.disable_mkl_buffer_cache()
    try:
        asyncio.run(run(args))
    except LoadFailed as exc:
        log.debug("model load traceback", exc_info=exc.__cause__)
        log.critical("%s", exc)
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> None:
    args = WorkerArgs.parse(argv)
    logs.configure()
    serve(args)
