"""Small synchronous HTTP helpers (aiohttp under asyncio.run) and an SSE parser for tests."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

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
    return metric_value(text, f"hybridpd_engine_{name}_total")


def metric_value(text: str, sample: str, **labels: str) -> float:
    """The value of one sample of a /metrics text (parsed by prometheus_client), matched by
    name and the given labels (others, such as model_name, are ignored); 0.0 when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0
