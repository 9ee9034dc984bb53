"""The asyncio face of the engine process, used by the API server.

Owns: a sender thread and a reader thread on the engine pipe (so the event loop never blocks on
it), per-request asyncio queues, stats queries, this process's prompt / generation token
counts (`tokens`, read by the periodic stats line), the request log (`log_requests`: one line
when a request is received, one when it finishes), and engine-death detection (every in-flight
request then ends with a 500 error output and `healthy` turns False; the engine's traceback is
logged here once, clients only ever see a one-line reason). Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from hybridpd.engine.protocol import EngineStats, ErrorKind, GenerateOutput, GenerateRequest
from hybridpd.request import FinishReason
from hybridpd.server import ipc
from hybridpd.server.engine_proc import EngineProcess

log = logging.getLogger(__name__)
request_log = logging.getLogger("hybridpd.requests")  # --enable-log-requests
READER_POLL_S = 0.2
THREAD_JOIN_S = 2.0
EXIT_WAIT_S = 1.0  # to learn a dead child's exit code
DEFAULT_STATS_TIMEOUT_S = 5.0
DEFAULT_OUTPUT_TIMEOUT_S = 600.0  # longest silence of the engine on one request


class EngineDeadError(RuntimeError):
    """The engine process is gone; no request can be served."""


class DuplicateRequestError(Exception):
    """A request with this id is already in flight on this instance."""


@dataclass
class TokenCounts:
    """Tokens of the requests served through this client, since it started (monotonic)."""

    prompt: int = 0  # counted when a request's first output arrives (its prefill is done)
    generation: int = 0


class EngineClient:
    """Async access to one started `EngineProcess`. Create it inside the running event loop."""

    def __init__(
        self, proc: EngineProcess, output_timeout_s: float = DEFAULT_OUTPUT_TIMEOUT_S,
        log_requests: bool = False,
    ) -> None:
        self._proc = proc
        self._log_requests = log_requests
        self.tokens = TokenCounts()
        self._loop = asyncio.get_running_loop()
        self._output_timeout_s = output_timeout_s
        self._queues: dict[str, asyncio.Queue[GenerateOutput]] = {}
        self._stats_waiters: dict[int, asyncio.Future[EngineStats]] = {}
        self._abort_waiters: dict[int, asyncio.Future[bool]] = {}
        self._tokens = itertools.count()
        self._outbox: queue.Queue[ipc.ToEngine | None] = queue.Queue()
        self._closing = threading.Event()
        self._dead_reason: str | None = None
        self._reader = threading.Thread(target=self._read_forever, daemon=True)
        self._sender = threading.Thread(target=self._send_forever, daemon=True)
        self._reader.start()
        self._sender.start()

    # ---- public API -----------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._dead_reason is None and self._proc.is_alive()

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    async def generate(self, req: GenerateRequest) -> AsyncGenerator[GenerateOutput, None]:
        """Outputs of one request until (and including) the finished one.

        Leaving early (break, cancellation, client disconnect) aborts the request in the engine,
        and so does giving up on it here (no output within `output_timeout_s`: the caller gets
        a finished 504 error output, and the engine is told to abort and free the request).
        """
        if not self.healthy:
            raise EngineDeadError(self._dead_reason or "engine process is not running")
        if req.request_id in self._queues:
            raise DuplicateRequestError(f"request id {req.request_id!r} is already in flight")
        q: asyncio.Queue[GenerateOutput] = asyncio.Queue()
        self._queues[req.request_id] = q
        if self._log_requests:
            request_log.info("received request %s: %d prompt tokens, params: %s%s",
                             req.request_id, len(req.prompt_token_ids), _changed(req.params),
                             ", P/D" if req.handoff else "")
        self._outbox.put(ipc.AddRequest(req))
        ended = False  # the request ended on the engine's side (or the engine died)
        generated, first = 0, True
        try:
            while True:
                out, gave_up = await self._next_output(req.request_id, q)
                ended = out.finished and not gave_up
                if first and out.error is None:
                    self.tokens.prompt += len(req.prompt_token_ids)
                first = False
                generated += len(out.new_token_ids)
                self.tokens.generation += len(out.new_token_ids)
                if out.finished and self._log_requests:
                    reason = out.finish_reason.value if out.finish_reason else "none"
                    request_log.info("finished request %s: %s, %d generated tokens%s",
                                     req.request_id, reason, generated,
                                     f" ({out.error_kind.value}: {out.error})" if out.error else "")
                yield out
                if out.finished:
                    return
        finally:
            if self._queues.pop(req.request_id, None) is not None and not ended:
                self._outbox.put(ipc.AbortRequest(req.request_id))

    async def abort(self, request_id: str) -> None:
        """Abort in the engine (also valid for ids not in flight here, e.g. held P blocks)."""
        q = self._queues.pop(request_id, None)
        if q is not None:
            q.put_nowait(_aborted(request_id))
        if self.healthy:
            self._outbox.put(ipc.AbortRequest(request_id))

    async def abort_checked(
        self, request_id: str, timeout_s: float = DEFAULT_STATS_TIMEOUT_S
    ) -> bool:
        """Abort `request_id`; whether it existed (in flight here, or held by the engine)."""
        q = self._queues.pop(request_id, None)
        if q is not None:
            q.put_nowait(_aborted(request_id))
        in_flight = q is not None
        if not self.healthy:
            return in_flight
        token = next(self._tokens)
        fut: asyncio.Future[bool] = self._loop.create_future()
        self._abort_waiters[token] = fut
        self._outbox.put(ipc.AbortQuery(token, request_id))
        try:
            return await asyncio.wait_for(fut, timeout_s) or in_flight
        finally:
            self._abort_waiters.pop(token, None)

    async def stats(self, timeout_s: float = DEFAULT_STATS_TIMEOUT_S) -> EngineStats:
        if not self.healthy:
            raise EngineDeadError(self._dead_reason or "engine process is not running")
        token = next(self._tokens)
        fut: asyncio.Future[EngineStats] = self._loop.create_future()
        self._stats_waiters[token] = fut
        self._outbox.put(ipc.StatsQuery(token))
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._stats_waiters.pop(token, None)

    async def close(self) -> None:
        """Stop the threads and the engine process (within deadlines)."""
        self._closing.set()
        self._outbox.put(None)
        await asyncio.to_thread(self._sender.join, THREAD_JOIN_S)
        await asyncio.to_thread(self._proc.stop)
        await asyncio.to_thread(self._reader.join, THREAD_JOIN_S)
        self._fail_all("engine shut down")

    # ---- event-loop side ------------------------------------------------------------------
    async def _next_output(
        self, request_id: str, q: asyncio.Queue
    ) -> tuple[GenerateOutput, bool]:
        """The next output, and whether it is our own timeout error (we gave up waiting)."""
        try:
            return await asyncio.wait_for(q.get(), self._output_timeout_s), False
        except asyncio.TimeoutError:
            msg = f"engine produced nothing for {self._output_timeout_s:.0f} s"
            return _error_output(request_id, msg, FinishReason.ERROR,
                                 ErrorKind.OUTPUT_TIMEOUT), True

    def _dispatch(self, msg: ipc.FromEngine) -> None:
        if isinstance(msg, ipc.Outputs):
            for out in msg.outputs:
                q = self._queues.get(out.request_id)
                if q is not None:  # outputs of aborted requests are dropped
                    q.put_nowait(out)
        elif isinstance(msg, ipc.StatsReply):
            fut = self._stats_waiters.get(msg.token)
            if fut is not None and not fut.done():
                fut.set_result(msg.stats)
        elif isinstance(msg, ipc.AbortReply):
            waiter = self._abort_waiters.get(msg.token)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg.found)
        elif isinstance(msg, ipc.Fatal):
            log.error("engine process died; its traceback:\n%s", msg.traceback.rstrip())
            self._fail_all(f"engine process died: {msg.summary}")

    def _fail_all(self, reason: str) -> None:
        if self._dead_reason is None:
            self._dead_reason = reason
        for request_id, q in list(self._queues.items()):
            q.put_nowait(_error_output(request_id, reason, FinishReason.ERROR, ErrorKind.INTERNAL))
        for fut in self._stats_waiters.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))
        for waiter in self._abort_waiters.values():
            if not waiter.done():
                waiter.set_exception(EngineDeadError(reason))

    # ---- threads ----------------------------------------------------------------------------
    def _send_forever(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None or self._dead_reason is not None:
                return
            try:
                self._proc.send(msg)
            except (OSError, EOFError, ValueError, RuntimeError):
                self._post_death("engine process died: its pipe closed while sending")
                return

    def _read_forever(self) -> None:
        while not self._closing.is_set():
            try:
                if not self._proc.conn.poll(READER_POLL_S):
                    if not self._proc.is_alive():
                        self._post_death(_exited(self._proc.wait_exit(EXIT_WAIT_S)))
                        return
                    continue
                msg = self._proc.conn.recv()
            except (OSError, EOFError, ValueError, RuntimeError):
                if not self._closing.is_set():
                    self._post_death(_exited(self._proc.wait_exit(EXIT_WAIT_S)))
                return
            self._post(msg)
            if isinstance(msg, ipc.Fatal):
                return

    def _post(self, msg: ipc.FromEngine) -> None:
        try:
            self._loop.call_soon_threadsafe(self._dispatch, msg)
        except RuntimeError:  # loop closed
            pass

    def _post_death(self, reason: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._die_without_goodbye, reason)
        except RuntimeError:
            pass

    def _die_without_goodbye(self, reason: str) -> None:
        """Death without a goodbye (killed, pipe closed): log it once, then fail everything."""
        if self._dead_reason is None:
            log.error("%s", reason)
        self._fail_all(reason)


def _changed(params: object) -> str:
    """The sampling parameters that differ from their defaults, as `name=value, ...`."""
    if not dataclasses.is_dataclass(params) or isinstance(params, type):
        return repr(params)
    parts = [f"{f.name}={getattr(params, f.name)!r}" for f in dataclasses.fields(params)
             if f.default is not dataclasses.MISSING and getattr(params, f.name) != f.default]
    return ", ".join(parts) or "defaults"


def _exited(exitcode: int | None) -> str:
    if exitcode is None:
        return "engine process died: its pipe closed"
    return f"engine process died: exited with code {exitcode}"


def _aborted(request_id: str) -> GenerateOutput:
    return _error_output(request_id, "aborted", FinishReason.ABORT, ErrorKind.ABORTED)


def _error_output(
    request_id: str, message: str, reason: FinishReason, kind: ErrorKind
) -> GenerateOutput:
    return GenerateOutput(
        request_id=request_id,
        new_token_ids=(),
        finished=True,
        finish_reason=reason,
        error=message,
        error_kind=kind,
    )
