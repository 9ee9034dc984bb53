"""Small synchronous HTTP helpers (aiohttp under asyncio.run) and an SSE parser for tests."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from multidict import CIMultiDict

TIMEOUT = aiohttp.ClientTimeout(total=30)


def request(method: str, url: str, body: Any = None, raw: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any, CIMultiDict]:
    """(status, decoded body: JSON when possible else text, headers)."""

    async def go() -> tuple[int, Any, CIMultiDict]:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            data = raw if raw is not None else (None if body is None else json.dumps(body))
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            async with s.request(method, url, data=data, headers=hdrs) as r:
                text = await r.text()
                try:
                    return r.status, json.loads(text), CIMultiDict(r.headers)
                except json.JSONDecodeError:
                    return r.status, text, CIMultiDict(r.headers)

    return asyncio.run(go())


def post(url: str, body: Any = None, **kw: Any) -> tuple[int, Any, CIMultiDict]:
    return request("POST", url, body, **kw)


def get(url: str) -> tuple[int, Any, CIMultiDict]:
    return request("GET", url)


def parse_sse(text: str) -> list[Any]:
    """Events of an SSE body: decoded JSON objects, and the string '[DONE]'."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_until(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def engine_counter(base: str, name: str) -> float:
    """Read `hybridpd_engine_<name>_total` from an instance's /metrics."""
    status, text, _ = get(f"{base}/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(f"hybridpd_engine_{name}_total "):
            return float(line.split()[-1])
    return 0.0
