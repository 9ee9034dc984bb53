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
# slow answers (timeouts, 5xx) in a row before a backend is taken out of rotation: one slow
# /health from a busy instance is not a dead one. A refused connection counts at once.
DEFAULT_FAILURE_THRESHOLD = 3


class HealthMonitor:
    def __init__(
        self,
        backends: list[Backend],
        session: aiohttp.ClientSession,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.backends, self.session = backends, session
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.failure_threshold = failure_threshold
        self._failures: dict[str, int] = {}  # backend url -> slow answers in a row
        self._task: asyncio.Task | None = None

    async def check(self, backend: Backend) -> bool:
        """One /health probe; the backend's `healthy` flag after it."""
        refused = False
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            async with self.session.get(f"{backend.url}/health", timeout=timeout) as r:
                ok = r.status == 200
                backend.last_error = None if ok else f"/health answered {r.status}"
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
            ok, refused, backend.last_error = False, True, f"/health failed: {exc!r}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            ok, backend.last_error = False, f"/health failed: {exc!r}"
        failures = 0 if ok else self._failures.get(backend.url, 0) + 1
        self._failures[backend.url] = failures
        if not ok and not refused and failures < self.failure_threshold:
            return backend.healthy  # a slow answer: out of rotation only when it repeats
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
