"""Reading and decoding JSON request bodies within bounds, for every hybridpd HTTP server.

Owns `BodyLimits` (size, read deadline, nesting depth, integer count), reading a body under
them (`read_body`: 413 past the size, checked against Content-Length before reading; 408 past
the deadline), and decoding it (`decode_json`: 400 for malformed JSON, for nesting deeper than
`max_depth` and for more integers than `max_ints`, never a RecursionError or a 500). Bodies
larger than `OFF_LOOP_BYTES` are decoded on a worker thread with a Python `parse_int` hook, so
the decoder yields the GIL while it works and stops at the first integer past the limit (a
60 MB token-id list costs neither a frozen event loop nor gigabytes of ints). Knows nothing of
what the bodies mean; raises `BodyError`, which the apps turn into their error shape.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_DEPTH = 32
OFF_LOOP_BYTES = 256 * 1024
READ_CHUNK = 256 * 1024


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
    max_ints: int | None = None  # integers in the whole body (token ids); None: unbounded

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
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.timeout_s):
            while True:
                chunk = await request.content.read(READ_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > limits.max_bytes:
                    raise _too_large(size, limits)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyError(f"request body not received within {limits.timeout_s:g} s",
                        status=408) from None
    return b"".join(chunks)


async def decode_json(raw: bytes, limits: BodyLimits) -> Any:
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(_decode, raw, limits, True)
    return _decode(raw, limits, False)


def _too_large(size: int, limits: BodyLimits) -> BodyError:
    return BodyError(f"request body of {size} bytes exceeds the limit of {limits.max_bytes} "
                     "bytes (sized from the model's context)", status=413)


class _IntCounter:
    """`parse_int` hook: a Python call per integer (the decoder yields the GIL between them)
    that refuses the body at the first integer past the limit."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.count = limit, 0

    def __call__(self, text: str) -> int:
        self.count += 1
        if self.limit is not None and self.count > self.limit:
            raise BodyError(f"request body holds more than {self.limit} integers (the model's "
                            "context bounds how many token ids a request can use)")
        return int(text)


def _decode(raw: bytes, limits: BodyLimits, large: bool) -> Any:
    try:
        if large or limits.max_ints is not None:
            obj = json.loads(raw, parse_int=_IntCounter(limits.max_ints))
        else:
            obj = json.loads(raw)
    except RecursionError:
        raise _too_deep(limits) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BodyError(f"malformed JSON body: {exc}") from None
    # depth <= number of opening brackets: only a body with many of them needs the walk
    if raw.count(b"[") + raw.count(b"{") > limits.max_depth and _depth(obj) > limits.max_depth:
        raise _too_deep(limits)
    return obj


def _too_deep(limits: BodyLimits) -> BodyError:
    return BodyError(f"JSON body nested deeper than {limits.max_depth} levels")


def _depth(obj: Any) -> int:
    """Nesting depth of arrays/objects (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(obj, 1)] if isinstance(obj, list | dict) else []
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, list | dict))
    return deepest
