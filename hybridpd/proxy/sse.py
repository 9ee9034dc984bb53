"""Server-sent events on the proxy: reading a backend's stream, writing the client's.

Owns reading the `data: ...` framing (writing it is the shared `hybridpd/openai/responses.sse`).
Knows nothing of what the payloads mean.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from hybridpd.openai.responses import sse as encode  # noqa: F401 - the proxy's writer

DONE = "[DONE]"


class MalformedEventError(ValueError):
    """A backend's stream carried something that is not a JSON object, [DONE] or UTF-8."""


async def events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any] | str]:
    """Decoded `data:` payloads of a stream: JSON objects, or the string "[DONE]"."""
    data: list[str] = []
    async for raw in content:
        try:
            line = raw.decode().rstrip("\r\n")
        except UnicodeDecodeError:
            raise MalformedEventError("backend stream is not UTF-8") from None
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif not line and data:
            payload = "\n".join(data)
            data = []
            yield _decode(payload)
    if data:
        yield _decode("\n".join(data))


def _decode(payload: str) -> dict[str, Any] | str:
    if payload == DONE:
        return payload
    try:
        event = json.loads(payload)
    except ValueError:
        raise MalformedEventError(f"backend sent a malformed event: {payload[:80]!r}") from None
    if not isinstance(event, dict):
        raise MalformedEventError(f"backend sent a non-object event: {payload[:80]!r}")
    return event
