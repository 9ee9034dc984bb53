"""Serving an aiohttp application on a TCP address, within connection bounds.

Owns the runner settings every hybridpd HTTP process uses (handler cancellation on client
disconnect, no access log, a shutdown deadline), the connection bounds (`SiteLimits`): an
idle timeout (a connection that has not delivered a complete request head within
`idle_timeout_s` of opening, or of its previous response, is closed — this is also the header
timeout) and a cap on open connections (past it a new connection gets a one-line 503 and is
closed at once, so thousands of idle sockets can neither exhaust file descriptors nor take the
process down; the refusals are logged once per interval, not per socket), and reporting the
bound port (returned, and written to a ready file for a launcher: `write_ready_file`). An error
answered before its body was read (413, 408) drains the rest for at most `LINGER_S`, then
closes. Body timeouts are `httpkit/bodies.py`'s. Knows nothing of what the
application serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 5.0
DEFAULT_IDLE_TIMEOUT_S = 30.0  # above aiohttp clients' 15 s pool keep-alive: no reuse races
DEFAULT_MAX_CONNECTIONS = 4096
FD_RESERVE = 256  # descriptors kept for everything but client connections
REFUSAL_LOG_INTERVAL_S = 10.0
BACKLOG = 128
LINGER_S = 2.0  # after an error answered before the body was read: drain this long, then close
_REFUSAL_BODY = (b'{"error": {"message": "too many open connections; retry later", '
                 b'"type": "server_error", "param": null, "code": "too_many_connections"}}')
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
            + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY)


@dataclass(frozen=True)
class SiteLimits:
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if not self.idle_timeout_s > 0 or self.max_connections < 1:
            raise ValueError(f"invalid site limits: {self}")


class ConnectionGuard:
    """Counts open connections of one site and refuses those past the cap."""

    def __init__(self, cap: int) -> None:
        self.cap, self.open, self.refused = cap, 0, 0
        self._logged_at = float("-inf")
        self._refused_at_log = 0

    def protocol(self, make: Any) -> asyncio.BaseProtocol:
        if self.open >= self.cap:
            self.refused += 1
            self._log_refusals()
            return _Refuse()
        self.open += 1
        return _Counted(make(), self)

    def closed(self) -> None:
        self.open -= 1

    def _log_refusals(self) -> None:
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_INTERVAL_S:
            log.warning("connection cap of %d reached: refused %d connection(s) since the "
                        "last report", self.cap, self.refused - self._refused_at_log)
            self._logged_at, self._refused_at_log = now, self.refused


class _Counted(asyncio.Protocol):
    """aiohttp's protocol, delegated to, with the guard told when the connection ends."""

    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self._inner, self._guard = inner, guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.closed()
        self._inner.connection_lost(exc)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        with contextlib.suppress(OSError, RuntimeError):
            transport.write(_REFUSAL)
        transport.close()


class _GuardedTCPSite(web.TCPSite):
    """A TCPSite whose connections go through a ConnectionGuard."""

    def __init__(self, runner: web.AppRunner, host: str, port: int,
                 guard: ConnectionGuard, sock: socket.socket | None = None) -> None:
        super().__init__(runner, host, port)
        self.guard = guard
        self.sock = sock  # already bound (`bind_socket`): served as is

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            self._server = await loop.create_server(
                lambda: self.guard.protocol(server), sock=self.sock, backlog=self._backlog)
            return
        self._server = await loop.create_server(
            lambda: self.guard.protocol(server), self._host, self._port,
            backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered to what the file-descriptor limit leaves for client connections."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = max(1, int(soft) - FD_RESERVE)
    if wanted > room:
        log.warning("connection cap lowered from %d to %d (file-descriptor limit %d)",
                    wanted, room, soft)
    return min(wanted, room)


def raise_fd_limit() -> int:
    """Raise this process's soft file-descriptor limit to its hard limit; the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0 = ephemeral), bound now so that a busy port is
    found before anything slow starts; `start_site(..., sock=)` serves on it. Raises OSError
    (e.g. EADDRINUSE) when the address cannot be bound."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_site(
    app: web.Application, host: str, port: int, limits: SiteLimits | None = None,
    sock: socket.socket | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 = ephemeral), or on the bound `sock` when given; returns
    the runner and the bound port.

    Handlers are cancelled when their client disconnects (which aborts engine requests).
    """
    limits = limits or SiteLimits()
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        keepalive_timeout=limits.idle_timeout_s, lingering_time=LINGER_S,
    )
    await runner.setup()
    site = _GuardedTCPSite(runner, host, port, ConnectionGuard(
        connection_cap(limits.max_connections)), sock)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, bound


def open_connections(runner: web.AppRunner) -> int:
    """Client connections open on the runner's guarded sites (for tests and metrics)."""
    return sum(s.guard.open for s in runner.sites if isinstance(s, _GuardedTCPSite))


async def wait_for_stop_signal() -> None:
    """Return on the first SIGINT or SIGTERM (the process's way to shut down cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def local_url(host: str, port: int) -> str:
    """A URL this host can reach a site bound to host:port at (loopback for a wildcard)."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host in ("::", "[::]") else host)
    netloc = f"[{shown}]" if ":" in shown else shown
    return f"http://{netloc}:{port}"


def write_ready_file(path: str, host: str, port: int,
                     extra: dict[str, Any] | None = None) -> None:
    """Tell a launcher the bound address: `{"url", "host", "port", "pid"}` (and `extra`, e.g.
    the side channels' bound addresses) as JSON, written atomically (a reader never sees half
    a file)."""
    doc = {**(extra or {}), "url": local_url(host, port), "host": host, "port": port,
           "pid": os.getpid()}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
