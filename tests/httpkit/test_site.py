"""The HTTP site's connection bounds: idle (and half-sent) connections are closed within the
idle timeout, connections past the cap get a 503 and are closed at once, and the server keeps
serving legitimate requests throughout."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from aiohttp import web

from hybridpd.httpkit.site import SiteLimits, open_connections, start_site

IDLE_S = 0.5
CAP = 50
WAIT_S = 20.0  # deadline on conditions we wait for (generous: a shared, loaded machine)
LONG_IDLE_S = 120.0  # the cap test: held connections must not time out while it runs


class Served:
    def __init__(self, limits: SiteLimits) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        app = web.Application()
        app.router.add_get("/ping", self._ping)
        self.runner, self.port = self.call(start_site(app, "127.0.0.1", 0, limits))

    @staticmethod
    async def _ping(request: web.Request) -> web.Response:
        return web.Response(text="pong")

    def call(self, coro):  # noqa: ANN001, ANN201
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def open_now(self) -> int:
        async def n() -> int:
            return open_connections(self.runner)
        return self.call(n())

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def served():
    s = Served(SiteLimits(idle_timeout_s=IDLE_S, max_connections=CAP))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def served_long_idle():
    s = Served(SiteLimits(idle_timeout_s=LONG_IDLE_S, max_connections=CAP))
    try:
        yield s
    finally:
        s.close()


def ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
        s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return _read_all(s)


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    s.settimeout(WAIT_S)
    return s


def wait_until(pred, timeout_s: float = WAIT_S) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_idle_and_half_sent_connections_are_closed_within_the_idle_timeout(served):
    idle = [connect(served.port) for _ in range(20)]
    half = connect(served.port)
    half.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")  # a head that never ends (slowloris)
    assert wait_until(lambda: served.open_now() == 21)
    assert b"pong" in ping(served.port)  # served while the idle ones are open
    for s in [*idle, half]:
        s.settimeout(WAIT_S)  # a hang guard: only the server's idle timeout can close it
        assert s.recv(1) == b""  # EOF: closed by the server's idle timeout, not at teardown
        s.close()
    assert wait_until(lambda: served.open_now() == 0)


def test_connections_past_the_cap_get_a_503_and_the_server_stays_up(served_long_idle):
    served = served_long_idle
    held = [connect(served.port) for _ in range(CAP)]
    assert wait_until(lambda: served.open_now() == CAP)
    extra = [connect(served.port) for _ in range(4 * CAP)]
    answers = [_read_all(s) for s in extra]  # each is answered and closed at once
    assert all(a.startswith(b"HTTP/1.1 503") and b"too_many_connections" in a for a in answers)
    assert served.open_now() == CAP
    for s in [*held, *extra]:
        s.close()
    assert wait_until(lambda: served.open_now() == 0)
    assert b"pong" in ping(served.port)
