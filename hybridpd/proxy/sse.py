"""Server-sent events on the proxy: reading a backend's stream, writing the client's.

Owns the `data: ...` framing only. Knows nothing of what the payloads mean.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

DONE = "[DONE]"


def encode(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


async def events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any] | str]:
    """Decoded `data:` payloads of a stream: JSON objects, or the string "[DONE]"."""
    data: list[str] = []
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif not line and data:
            payload = "\n".join(data)
            data = []
            yield payload if payload == DONE else json.loads(payload)
    if data:
        payload = "\n".join(data)
        yield payload if payload == DONE else json.loads(payload)
