"""Async load generator: streamed OpenAI-compatible requests at a fixed concurrency or a Poisson
request rate.

Owns `LoadSpec`, the request bodies (`completions` sends token ids or text; `chat` sends text
as one user message), the SSE reading and the per-request clock. Every request asks for
`ignore_eos`, `temperature 0`, `stream`, usage in the stream and `return_token_ids`, so token
counts come from the server, never from text: a chunk is a token event when it carries token
ids (or, from a server without `return_token_ids`, text), and the output token count is
`usage.completion_tokens`, else the sum of the chunks' token ids; only a server that sends
neither is counted by content chunks (`token_source` says which). A model whose tokens have no
text is therefore measured exactly. The proxy's `pd_timing` and D's `kv_transfer_stats` on the
final chunk give the request's P/D phases. Warm-up requests run first and are not returned.
Prompts come from `datasets.py` (random by default). Must not know statistics, reports or
the server's internals.
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

from hybridpd.bench.datasets import WORDS, BenchPrompt
from hybridpd.bench.metrics import RequestResult


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
    dataset: tuple[BenchPrompt, ...] | None = None  # None: random, prompt_len / output_len
    warmup: int = 0  # requests sent (at the run's concurrency) before the measured ones


def make_prompts(spec: LoadSpec) -> list[list[int] | str]:
    """`num_requests` random prompts, reproducible from the seed: token ids or words."""
    rng = random.Random(spec.seed)
    low, high = spec.token_id_range
    if spec.endpoint is Endpoint.COMPLETIONS:
        return [[rng.randrange(low, high) for _ in range(spec.prompt_len)]
                for _ in range(spec.num_requests)]
    return [" ".join(rng.choice(WORDS) for _ in range(spec.prompt_len))
            for _ in range(spec.num_requests)]


def bench_prompts(spec: LoadSpec) -> list[BenchPrompt]:
    """The measured requests: the dataset's, else random ones of the fixed lengths."""
    if spec.dataset is not None:
        return list(spec.dataset)
    return [BenchPrompt(p, spec.output_len) for p in make_prompts(spec)]


def request_body(spec: LoadSpec, prompt: list[int] | str | BenchPrompt) -> dict[str, Any]:
    item = prompt if isinstance(prompt, BenchPrompt) else BenchPrompt(prompt, spec.output_len)
    body: dict[str, Any] = {
        "model": spec.model,
        "max_tokens": item.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    if spec.endpoint is Endpoint.COMPLETIONS:
        body["prompt"] = item.prompt
    else:
        text = item.prompt if isinstance(item.prompt, str) else " ".join(map(str, item.prompt))
        body["messages"] = [{"role": "user", "content": text}]
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


class _Tally:
    """What one stream said about its tokens and P/D phases."""

    def __init__(self) -> None:
        self.stamps: list[float] = []  # one per chunk that carried tokens
        self.usage_tokens: int | None = None
        self.id_tokens = 0
        self.saw_ids = False
        self.chunks_with_text = 0
        self.timing: dict[str, Any] = {}
        self.transfer: dict[str, Any] = {}

    def add(self, chunk: dict[str, Any], now: float) -> None:
        choice = (chunk.get("choices") or [{}])[0]
        ids = choice.get("token_ids")
        text = _chunk_text(chunk)
        if isinstance(ids, list):
            self.saw_ids = True
            self.id_tokens += len(ids)
        if (isinstance(ids, list) and ids) or (not isinstance(ids, list) and text):
            self.stamps.append(now)
        if text:
            self.chunks_with_text += 1
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])
        self.timing = chunk.get("pd_timing") or self.timing
        self.transfer = chunk.get("kv_transfer_stats") or self.transfer

    def tokens(self) -> tuple[int, str]:
        if self.usage_tokens is not None:
            return self.usage_tokens, "usage"
        if self.saw_ids:
            return self.id_tokens, "token_ids"
        return self.chunks_with_text, "chunks"

    def phases(self) -> dict[str, float]:
        """P queue + prefill, transfer, handover and its rest (D's first token), seconds."""
        out = {k: float(v) for k, v in self.timing.items()
               if k in ("prefill_s", "handover_s", "transfer_s")
               and isinstance(v, int | float) and not isinstance(v, bool)}
        if "transfer_s" not in out and isinstance(self.transfer.get("seconds"), int | float):
            out["transfer_s"] = float(self.transfer["seconds"])
        if "handover_s" in out and "transfer_s" in out:
            out["d_first_token_s"] = max(0.0, out["handover_s"] - out["transfer_s"])
        return out


async def send_one(session: aiohttp.ClientSession, spec: LoadSpec,
                   prompt: list[int] | str | BenchPrompt) -> RequestResult:
    """Stream one request; errors become a failed RequestResult, never an exception."""
    item = prompt if isinstance(prompt, BenchPrompt) else BenchPrompt(prompt, spec.output_len)
    prompt_tokens = len(item.prompt) if isinstance(item.prompt, list) else spec.prompt_len
    tally = _Tally()
    start = time.perf_counter()
    try:
        async with session.post(spec.url.rstrip("/") + spec.endpoint.path,
                                json=request_body(spec, item)) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                return RequestResult(False, prompt_tokens, 0, error=f"HTTP {resp.status}: {text}")
            async for chunk in _sse_chunks(resp):
                if "error" in chunk:
                    return RequestResult(False, prompt_tokens, 0,
                                         error=f"stream error: {str(chunk['error'])[:200]}")
                tally.add(chunk, time.perf_counter())
                usage = chunk.get("usage")
                if usage and usage.get("prompt_tokens"):
                    prompt_tokens = int(usage["prompt_tokens"])
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return RequestResult(False, prompt_tokens, 0, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    n_out, source = tally.tokens()
    if not tally.stamps or n_out < 1:
        return RequestResult(False, prompt_tokens, 0,
                             error="the stream reported no tokens (no token ids, usage or text)")
    stamps = tally.stamps
    return RequestResult(
        ok=True,
        prompt_tokens=prompt_tokens,
        output_tokens=n_out,
        ttft_s=stamps[0] - start,
        e2e_s=end - start,
        itls_s=tuple(b - a for a, b in zip(stamps, stamps[1:])),
        token_source=source,
        phases=tally.phases(),
    )


async def run_load(spec: LoadSpec, concurrency: int, request_rate: float | None = None
                   ) -> tuple[list[RequestResult], float]:
    """Send every prompt with at most `concurrency` in flight — all at once, or arriving as a
    Poisson process of `request_rate` requests/s (seeded) — after `spec.warmup` warm-up
    requests whose results are dropped; returns the measured results and their wall time."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if request_rate is not None and not request_rate > 0:
        raise ValueError(f"request rate must be > 0, got {request_rate}")
    prompts = bench_prompts(spec)
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=spec.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    gaps = random.Random(spec.seed + 1)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def one(prompt: BenchPrompt) -> RequestResult:
            async with gate:
                return await send_one(session, spec, prompt)

        if spec.warmup:
            await asyncio.gather(*(one(prompts[k % len(prompts)]) for k in range(spec.warmup)))
        start = time.perf_counter()
        if request_rate is None:
            results = await asyncio.gather(*(one(p) for p in prompts))
        else:
            tasks = []
            for p in prompts:
                tasks.append(asyncio.create_task(one(p)))
                await asyncio.sleep(gaps.expovariate(request_rate))  # the arrival process
            results = await asyncio.gather(*tasks)
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
