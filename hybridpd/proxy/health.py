"""Background health checks of the proxy's backends.

Owns the periodic GET /health of every backend (each with a deadline) and flipping their
`healthy` flags. Knows nothing of request routing beyond the `Backend` records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from hybridpd.proxy.routing import Backend

log = logging.getLogger(__name__)
DEFAULT_INTERVAL_S = 1.0
DEFAULT_TIMEOUT_S = 1.0


class HealthMonitor:
    def __init__(
        self,
        backends: list[Backend],
        session: aiohttp.ClientSession,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.backends, self.session = backends, session
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._task: asyncio.Task | None = None

    async def check(self, backend: Backend) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            async with self.session.get(f"{backend.url}/health", timeout=timeout) as r:
                ok = r.status == 200
                backend.last_error = None if ok else f"/health answered {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            ok, backend.last_error = False, f"/health failed: {exc!r}"
        if ok != backend.healthy:
            log.warning("backend %s is now %s", backend.url, "healthy" if ok else "unhealthy")
        backend.healthy = ok
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def _run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
