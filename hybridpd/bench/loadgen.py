"""Async load generator: streamed OpenAI-compatible requests at a fixed concurrency.

Owns `LoadSpec`, the random prompts, the request bodies (`completions` sends the prompt as a
list of token ids; `chat` sends random words), the SSE reading and the per-request clock.
Every request asks for `ignore_eos`, `temperature 0`, `stream` and usage in the stream; the
output token count is the server's `usage.completion_tokens` when it sends one, else the number
of content chunks. Must not know statistics, reports or the server's internals.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from hybridpd.bench.metrics import RequestResult

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo")


class Endpoint(str, enum.Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"

    @property
    def path(self) -> str:
        return "/v1/completions" if self is Endpoint.COMPLETIONS else "/v1/chat/completions"


@dataclass(frozen=True)
class LoadSpec:
    """What to send, and how many, independent of the concurrency level."""

    url: str
    endpoint: Endpoint
    model: str
    num_requests: int
    prompt_len: int
    output_len: int
    seed: int = 0
    token_id_range: tuple[int, int] = (10, 250)  # [low, high) of random prompt token ids
    request_timeout_s: float = 600.0


def make_prompts(spec: LoadSpec) -> list[list[int] | str]:
    """`num_requests` prompts, reproducible from the seed: token ids or words."""
    rng = random.Random(spec.seed)
    low, high = spec.token_id_range
    if spec.endpoint is Endpoint.COMPLETIONS:
        return [[rng.randrange(low, high) for _ in range(spec.prompt_len)]
                for _ in range(spec.num_requests)]
    return [" ".join(rng.choice(WORDS) for _ in range(spec.prompt_len))
            for _ in range(spec.num_requests)]


def request_body(spec: LoadSpec, prompt: list[int] | str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model,
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.endpoint is Endpoint.COMPLETIONS:
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text of one SSE chunk (completions or chat), '' when none."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


async def _sse_chunks(response: aiohttp.ClientResponse):
    """Parsed JSON payloads of `data:` lines until `[DONE]`."""
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def send_one(session: aiohttp.ClientSession, spec: LoadSpec,
                   prompt: list[int] | str) -> RequestResult:
    """Stream one request; errors become a failed RequestResult, never an exception."""
    prompt_tokens = len(prompt) if isinstance(prompt, list) else spec.prompt_len
    stamps: list[float] = []
    usage_tokens: int | None = None
    start = time.perf_counter()
    try:
        async with session.post(spec.url.rstrip("/") + spec.endpoint.path,
                                json=request_body(spec, prompt)) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                return RequestResult(False, prompt_tokens, 0, error=f"HTTP {resp.status}: {text}")
            async for chunk in _sse_chunks(resp):
                if _chunk_text(chunk):
                    stamps.append(time.perf_counter())
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return RequestResult(False, prompt_tokens, 0, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if not stamps:
        return RequestResult(False, prompt_tokens, 0, error="no content in the stream")
    return RequestResult(
        ok=True,
        prompt_tokens=prompt_tokens,
        output_tokens=usage_tokens if usage_tokens is not None else len(stamps),
        ttft_s=stamps[0] - start,
        e2e_s=end - start,
        itls_s=tuple(b - a for a, b in zip(stamps, stamps[1:])),
    )


async def run_load(spec: LoadSpec, concurrency: int) -> tuple[list[RequestResult], float]:
    """Send every prompt with at most `concurrency` in flight; returns results and wall time."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    prompts = make_prompts(spec)
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=spec.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def one(prompt: list[int] | str) -> RequestResult:
            async with gate:
                return await send_one(session, spec, prompt)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return list(results), time.perf_counter() - start


async def fetch_model_name(url: str, timeout_s: float = 10.0) -> str:
    """The first model id `/v1/models` lists."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url.rstrip("/") + "/v1/models") as resp:
            resp.raise_for_status()
            data = await resp.json()
    models = data.get("data") or []
    if not models:
        raise ValueError(f"{url}/v1/models lists no model")
    return str(models[0]["id"])
