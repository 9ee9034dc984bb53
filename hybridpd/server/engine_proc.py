"""The engine child process, seen from the API process.

Owns: starting the child (forked from this process's forkserver, `hybridpd/process_start.py`:
the engine's modules are imported once per API process, not once per engine), the startup
handshake with its deadline, the parent end of the pipe, and stopping the child (graceful, then
terminate, then kill).
Knows nothing of asyncio or HTTP (see `engine_client.py` for the asyncio side) and nothing of
what the engine computes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from hybridpd.engine.protocol import EngineCore
from hybridpd.process_start import start_process
from hybridpd.server import ipc
from hybridpd.server.engine_loop import engine_process_main

DEFAULT_STARTUP_TIMEOUT_S = 600.0
STARTUP_POLL_S = 0.1


class EngineStartupError(RuntimeError):
    """The engine process died or timed out while starting; the message holds its traceback,
    `summary` one line, `config_error` whether the engine refused its configuration."""

    def __init__(self, message: str, summary: str = "", config_error: bool = False) -> None:
        super().__init__(message)
        self.summary = summary or message.strip().splitlines()[0]
        self.config_error = config_error


class EngineProcess:
    """One engine child process and the parent end of its pipe."""

    def __init__(
        self,
        factory: Callable[[], EngineCore],
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        name: str = "hybridpd-engine",
        log_level: int | str = logging.INFO,
    ) -> None:
        self._factory = factory
        self._log_level = log_level
        self._startup_timeout_s = startup_timeout_s
        self._name = name
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self.side_channels: tuple[str, ...] = ()  # reported by the child once ready

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("engine process not started")
        return self._conn

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def exitcode(self) -> int | None:
        return None if self._proc is None else self._proc.exitcode

    def wait_exit(self, timeout_s: float) -> int | None:
        """The exit code once the child has exited (None if it is still running at the
        deadline); for reporting a death the pipe noticed before the OS reaped the child."""
        if self._proc is not None:
            self._proc.join(timeout_s)
        return self.exitcode

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def start(self) -> None:
        """Start the child and block until it is ready. Raises EngineStartupError."""
        parent, child = mp.Pipe(duplex=True)
        # Not a daemon: the engine may start its own worker processes (tensor parallelism).
        proc = start_process(engine_process_main, (self._factory, child, self._log_level),
                             self._name, daemon=False)
        child.close()
        self._proc, self._conn = proc, parent
        try:
            self._await_ready()
        except BaseException:
            self.stop(timeout_s=2.0)
            raise

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self.conn.poll(STARTUP_POLL_S):
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    break
                if isinstance(msg, ipc.Ready):
                    self.side_channels = msg.side_channels
                    return
                if isinstance(msg, ipc.StartupFailed):
                    raise EngineStartupError(f"engine failed to start:\n{msg.traceback}",
                                             msg.summary, msg.config_error)
                raise EngineStartupError(f"unexpected startup message {type(msg).__name__}")
            if not self.is_alive() and not self.conn.poll(0):
                break
        if self.is_alive():
            raise EngineStartupError(
                f"engine did not become ready within {self._startup_timeout_s:.0f} s"
            )
        raise EngineStartupError(f"engine process exited during startup (code {self.exitcode})")

    def send(self, msg: ipc.ToEngine) -> None:
        self.conn.send(msg)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the child to shut down; past the deadline terminate it, then kill it."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        if proc.is_alive() and conn is not None:
            try:
                conn.send(ipc.Shutdown())
            except (OSError, EOFError, ValueError):
                pass
        proc.join(timeout_s)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout_s)
        if conn is not None:
            conn.close()
        self._conn = None
