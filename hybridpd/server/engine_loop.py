"""The loop that runs inside the engine process.

Owns: the child's logging setup, building the engine from a picklable factory, draining the
request pipe, stepping the engine, and sending outputs back. Knows nothing of HTTP or asyncio;
talks only through the messages of `server/ipc.py`.
"""

from __future__ import annotations

import logging
import signal
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

from hybridpd.engine.protocol import DuplicateRequestError, EngineCore, ErrorKind, GenerateOutput
from hybridpd.httpkit.logs import configure_logging
from hybridpd.request import FinishReason
from hybridpd.server import ipc

IDLE_POLL_S = 0.05  # how long the loop blocks on the pipe when the engine has nothing at all
# what building an engine raises when the configuration is refused (a value out of range, a
# split TP cannot make, weights missing from the checkpoint): told in one line, not a crash
CONFIG_ERRORS = (ValueError, KeyError, FileNotFoundError)


def engine_process_main(
    factory: Callable[[], EngineCore], conn: Connection, log_level: int | str = logging.INFO
) -> None:
    """Entry point of the child process: logging, build the engine, report ready, then loop.

    The "hybridpd" logger (e.g. "hybridpd.transfer": one line per KV transfer) goes to stderr
    at `log_level`. Ctrl-C is the API process's to handle (it shuts us down over the pipe); a
    parent that dies closes the pipe, which ends the loop.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(log_level)
    try:
        engine = factory()
    except BaseException as exc:  # noqa: BLE001 - every startup failure must reach the parent
        _send_quietly(conn, ipc.StartupFailed(traceback.format_exc(), summarize(exc),
                                              isinstance(exc, CONFIG_ERRORS)))
        return
    # the ports the side channels bound (port 0: ephemeral), for the ready file; a test
    # double of EngineCore may have none
    conn.send(ipc.Ready(tuple(getattr(engine, "side_channels", ()))))
    try:
        run_loop(engine, conn)
    except (EOFError, OSError):
        pass  # the API process went away: nothing left to serve
    except BaseException as exc:  # noqa: BLE001
        _send_quietly(conn, ipc.Fatal(traceback.format_exc(), summarize(exc)))
        raise SystemExit(1) from None
    finally:
        try:
            engine.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def run_loop(engine: EngineCore, conn: Connection) -> None:
    """Drain the pipe, step the engine, send outputs; return on Shutdown. The engine never
    sleeps: the loop blocks on the pipe for as long as `idle_wait_s()` allows (a message
    wakes it at once)."""
    while True:
        wait = engine.idle_wait_s()
        timeout = IDLE_POLL_S if wait is None else wait
        while conn.poll(timeout):
            if not _handle(engine, conn, conn.recv()):
                return
            timeout = 0.0
        if engine.has_work():
            outputs = engine.step()
            if outputs:
                conn.send(ipc.Outputs(tuple(outputs)))


def _handle(engine: EngineCore, conn: Connection, msg: ipc.ToEngine) -> bool:
    """Apply one message; False means shut down."""
    if isinstance(msg, ipc.AddRequest):
        rid = msg.request.request_id
        try:
            engine.add_request(msg.request)
        except ValueError as exc:
            kind = ErrorKind.DUPLICATE_ID if is_duplicate_id_error(exc, rid) \
                else ErrorKind.INVALID_REQUEST
            conn.send(ipc.Outputs((_rejected(rid, str(exc), kind),)))
    elif isinstance(msg, ipc.AbortRequest):
        engine.abort_request(msg.request_id)
    elif isinstance(msg, ipc.AbortQuery):
        conn.send(ipc.AbortReply(msg.token, bool(engine.abort_request(msg.request_id))))
    elif isinstance(msg, ipc.StatsQuery):
        conn.send(ipc.StatsReply(msg.token, engine.stats()))
    elif isinstance(msg, ipc.Shutdown):
        return False
    else:
        raise TypeError(f"unknown message on the engine pipe: {type(msg).__name__}")
    return True


def summarize(exc: BaseException) -> str:
    """"<exception type>: <first line of its message>" (no traceback, no multi-line dumps)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def is_duplicate_id_error(exc: BaseException, request_id: str) -> bool:
    """Was `add_request` refused because the engine still holds this request id?"""
    return isinstance(exc, DuplicateRequestError)


def _rejected(request_id: str, message: str, kind: ErrorKind) -> GenerateOutput:
    return GenerateOutput(
        request_id=request_id,
        new_token_ids=(),
        finished=True,
        finish_reason=FinishReason.ERROR,
        error=message,
        error_kind=kind,
    )


def _send_quietly(conn: Connection, msg: ipc.FromEngine) -> None:
    try:
        conn.send(msg)
    except (OSError, EOFError):
        pass
