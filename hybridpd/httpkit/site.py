"""Serving an aiohttp application on a TCP address.

Owns the runner settings every hybridpd HTTP process uses (handler cancellation on client
disconnect, no access log, a shutdown deadline) and reporting the bound port (returned, and
written to a ready file for a launcher: `write_ready_file`). Knows nothing of what the
application serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

from aiohttp import web

SHUTDOWN_TIMEOUT_S = 5.0


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 = ephemeral); returns the runner and the bound port.

    Handlers are cancelled when their client disconnects (which aborts engine requests).
    """
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, bound


async def wait_for_stop_signal() -> None:
    """Return on the first SIGINT or SIGTERM (the process's way to shut down cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def write_ready_file(path: str, host: str, port: int) -> None:
    """Tell a launcher the bound address: `{"url", "host", "port", "pid"}` as JSON, written
    atomically (a reader never sees half a file)."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host in ("::", "[::]") else host)
    netloc = f"[{shown}]" if ":" in shown else shown
    doc = {"url": f"http://{netloc}:{port}", "host": host, "port": port, "pid": os.getpid()}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
