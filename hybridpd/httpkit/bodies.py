"""Reading and decoding JSON request bodies within bounds, for every hybridpd HTTP server.

Owns `BodyLimits` (size, read deadline, nesting depth, number of JSON values), reading a body
under them (`read_body`: 413 past the size, checked against Content-Length before reading;
408 past the deadline), and decoding it (`decode_json`: 400 for malformed JSON, for nesting
deeper than `max_depth` and for more than `max_values` values, never a RecursionError or a
500). A body larger than `OFF_LOOP_BYTES` is first inspected in a helper process (parsed,
its depth and values counted, nothing returned but a verdict), so a 60 MB token-id list or a
million-element array costs the serving process neither a frozen event loop (the decoder
holds the GIL) nor gigabytes of Python objects; only a body that passed is decoded here, off
the event loop. Knows nothing of what the bodies mean; raises `BodyError`, which the apps turn
into their error shape.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from aiohttp import web

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_DEPTH = 32
OFF_LOOP_BYTES = 256 * 1024
READ_CHUNK = 256 * 1024
INSPECT_TIMEOUT_S = 30.0
INSPECT_WORKERS = 2
INSPECT_TASKS_PER_WORKER = 64  # then the worker is replaced (memory an attack left behind)


class BodyError(Exception):
    """A body refused before anything acted on it; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S  # the whole body must arrive within this
    max_depth: int = DEFAULT_MAX_DEPTH  # nesting of arrays/objects
    max_values: int | None = None  # JSON values in the body (numbers, strings...); None: any

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.timeout_s <= 0 or self.max_depth < 1:
            raise ValueError(f"invalid body limits: {self}")


async def read_json(request: web.Request, limits: BodyLimits) -> Any:
    """The decoded JSON body of `request`; BodyError when it breaks `limits`."""
    return await decode_json(await read_body(request, limits), limits)


async def read_body(request: web.Request, limits: BodyLimits) -> bytes:
    declared = request.content_length
    if declared is not None and declared > limits.max_bytes:
        raise _too_large(declared, limits)

    async def read_all() -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.read(READ_CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limits.max_bytes:
                raise _too_large(size, limits)
            chunks.append(chunk)

    try:
        return await asyncio.wait_for(read_all(), limits.timeout_s)
    except asyncio.TimeoutError:  # the builtin TimeoutError from 3.11 on
        raise BodyError(f"request body not received within {limits.timeout_s:g} s",
                        status=408) from None


async def decode_json(raw: bytes, limits: BodyLimits) -> Any:
    if len(raw) <= OFF_LOOP_BYTES:
        return decode_bounded(raw, limits)
    problem = await _inspect_elsewhere(raw, limits)
    if problem is not None:
        raise BodyError(problem)
    return await asyncio.to_thread(decode_bounded, raw, limits)


def decode_bounded(raw: bytes, limits: BodyLimits) -> Any:
    """Decode here; the depth/value walk runs only when the bracket or comma counts (cheap,
    and upper bounds) say a limit could be broken."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise BodyError(_too_deep(limits.max_depth)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BodyError(f"malformed JSON body: {exc}") from None
    brackets = raw.count(b"[") + raw.count(b"{")
    deep = brackets > limits.max_depth  # values <= commas + containers + 1
    many = limits.max_values is not None and raw.count(b",") + brackets + 1 > limits.max_values
    if deep or many:
        problem = _shape_problem(obj, limits.max_depth, limits.max_values)
        if problem is not None:
            raise BodyError(problem)
    return obj


def inspect_json(raw: bytes, max_depth: int, max_values: int | None) -> str | None:
    """What is wrong with a body (None: nothing). Runs in the helper process."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        return _too_deep(max_depth)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"malformed JSON body: {exc}"
    return _shape_problem(obj, max_depth, max_values)


def _too_large(size: int, limits: BodyLimits) -> BodyError:
    return BodyError(f"request body of {size} bytes exceeds the limit of {limits.max_bytes} "
                     "bytes (sized from the model's context)", status=413)


def _too_deep(max_depth: int) -> str:
    return f"JSON body nested deeper than {max_depth} levels"


def _shape_problem(obj: Any, max_depth: int, max_values: int | None) -> str | None:
    """Depth and value count of arrays/objects, without recursion."""
    values = 1
    stack = [(obj, 1)] if isinstance(obj, list | dict) else []
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return _too_deep(max_depth)
        children = node.values() if isinstance(node, dict) else node
        values += len(children)
        if max_values is not None and values > max_values:
            return (f"JSON body holds more than {max_values} values (the model's context "
                    "bounds how large a request can be)")
        stack.extend((c, depth + 1) for c in children if isinstance(c, list | dict))
    return None


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _inspector() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            context = multiprocessing.get_context("spawn")
            if sys.version_info >= (3, 11):  # workers replaced after this many bodies
                _pool = ProcessPoolExecutor(
                    max_workers=INSPECT_WORKERS, mp_context=context, initializer=_worker_init,
                    max_tasks_per_child=INSPECT_TASKS_PER_WORKER)
            else:
                _pool = ProcessPoolExecutor(max_workers=INSPECT_WORKERS, mp_context=context,
                                            initializer=_worker_init)
        return _pool


def _worker_init() -> None:
    """Ctrl-C is the serving process's to handle (it reaches the whole process group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _drop_inspector(broken: ProcessPoolExecutor) -> None:
    global _pool
    with _pool_lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


async def _inspect_elsewhere(raw: bytes, limits: BodyLimits) -> str | None:
    pool = _inspector()
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(pool, inspect_json, raw, limits.max_depth, limits.max_values)
    try:
        return await asyncio.wait_for(job, INSPECT_TIMEOUT_S)
    except BrokenProcessPool:  # the helper died (e.g. out of memory on a hostile body)
        _drop_inspector(pool)
        return "request body could not be inspected (too large or too complex)"
    except asyncio.TimeoutError:
        raise BodyError(f"request body not inspected within {INSPECT_TIMEOUT_S:g} s; retry",
                        status=503) from None
