"""The proxy's health checks: a slow /health takes a backend out of rotation only when it
repeats; a refused connection (the instance is gone) does at once; one good answer brings it
back."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from hybridpd.proxy.health import HealthMonitor
from hybridpd.proxy.routing import Backend, BackendRole


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens: connections are refused


async def _slow_then_fast(threshold: int) -> list[bool]:
    slow, release = asyncio.Event(), asyncio.Event()
    slow.set()

    async def health(_: web.Request) -> web.Response:
        if slow.is_set():
            await release.wait()  # never answers within the probe's deadline
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner, url = await _serve(app)
    backend = Backend(url, BackendRole.DECODE)
    seen = []
    try:
        async with aiohttp.ClientSession() as session:
            mon = HealthMonitor([backend], session, timeout_s=0.05, failure_threshold=threshold)
            for _ in range(threshold):
                seen.append(await mon.check(backend))
            slow.clear()
            seen.append(await mon.check(backend))
    finally:
        release.set()
        await runner.cleanup()
    return seen


@pytest.mark.parametrize("threshold", [1, 3])
def test_slow_answers_count_only_when_they_repeat(threshold):
    seen = asyncio.run(_slow_then_fast(threshold))
    # healthy until the threshold-th slow answer in a row, then back on the first good one
    assert seen == [True] * (threshold - 1) + [False, True]


def test_a_refused_connection_takes_the_backend_out_at_once():
    async def run() -> tuple[bool, str | None]:
        backend = Backend(_closed_port_url(), BackendRole.PREFILL)
        async with aiohttp.ClientSession() as session:
            mon = HealthMonitor([backend], session, timeout_s=1.0, failure_threshold=3)
            return await mon.check(backend), backend.last_error

    healthy, error = asyncio.run(run())
    assert not healthy and error is not None and "/health failed" in error


def test_the_threshold_must_be_positive():
    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            HealthMonitor([], session, failure_threshold=0)

    with pytest.raises(ValueError, match="failure_threshold"):
        asyncio.run(run())
