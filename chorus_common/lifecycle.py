"""Process lifecycle shared by the servers the `chorus` command runs."""

from __future__ import annotations

import asyncio
import signal


async def wait_for_signal() -> None:
    """Return when the process gets SIGINT or SIGTERM (Kubernetes stops pods with SIGTERM)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def serve_metrics(host: str, port: int) -> int:
    """Serve Prometheus metrics at http://host:port/metrics in a thread; returns the bound port."""
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=host)
    return int(server.server_port)
