"""Running an instance: engine process + engine client + HTTP site, started and stopped together.

Owns the lifecycle (start order, deadlines, teardown in reverse order) so that the CLI and the
tests start instances the same way. Knows nothing of request handling.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from hybridpd.engine.protocol import EngineCore
from hybridpd.httpkit.site import SHUTDOWN_TIMEOUT_S, SiteLimits, start_site
from hybridpd.server.api import build_app
from hybridpd.server.engine_client import EngineClient
from hybridpd.server.engine_proc import DEFAULT_STARTUP_TIMEOUT_S, EngineProcess
from hybridpd.server.serving import ServerConfig


@dataclass
class RunningInstance:
    """A started instance; `port` is the bound port (useful with port 0)."""

    proc: EngineProcess
    client: EngineClient
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(self.runner.cleanup(), SHUTDOWN_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass
        finally:
            await self.client.close()


async def start_instance(
    factory: Callable[[], EngineCore],
    tokenizer: Any,
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    log_level: int | str = logging.INFO,
    site_limits: SiteLimits | None = None,
    sock: socket.socket | None = None,
    log_requests: bool = False,
) -> RunningInstance:
    """Start the engine process (blocking work off the event loop), then the HTTP site.

    `log_level` applies to the "hybridpd" logger inside the engine process; `site_limits`
    bounds the HTTP connections (idle timeout, connection cap). `sock`: a socket the caller
    bound before (`httpkit.site.bind_socket`, so a busy port is found before the model loads;
    connections wait in its backlog until the site serves); it is closed when the start fails.
    `log_requests`: one log line per request received and finished.
    """
    proc = EngineProcess(factory, startup_timeout_s=startup_timeout_s, log_level=log_level)
    try:
        await asyncio.to_thread(proc.start)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    client = EngineClient(proc, log_requests=log_requests)
    try:
        runner, bound = await start_site(build_app(client, tokenizer, config), host, port,
                                        site_limits, sock=sock)
    except BaseException:
        if sock is not None:
            sock.close()
        await client.close()
        raise
    return RunningInstance(proc, client, runner, bound)
