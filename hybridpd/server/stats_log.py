"""The periodic throughput / queue line of `hybridpd serve`, shaped like `vllm serve`'s.

Owns sampling this process's token counters (`EngineClient.tokens`) and the engine's stats
every `--log-stats-interval` seconds and logging "Avg prompt throughput: x tokens/s, Avg
generation throughput: y tokens/s, Running: r reqs, Waiting: w reqs, KV cache usage: u%".
An idle instance logs one idle line, then stays quiet until work arrives. Knows nothing of
HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from hybridpd.engine.protocol import EngineStats
from hybridpd.server.engine_client import EngineClient, EngineDeadError

log = logging.getLogger("hybridpd.stats")
DEFAULT_INTERVAL_S = 10.0


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    prompt_tokens: int
    generation_tokens: int


def stats_line(prev: Sample, now: Sample, stats: EngineStats) -> str:
    """The line for the interval from `prev` to `now`, with the engine's queue and pool."""
    span = max(now.at - prev.at, 1e-9)
    prompt = (now.prompt_tokens - prev.prompt_tokens) / span
    gen = (now.generation_tokens - prev.generation_tokens) / span
    total = stats.pool_total_blocks
    usage = 0.0 if total <= 0 else 100.0 * (total - stats.pool_free_blocks) / total
    return (f"Avg prompt throughput: {prompt:.1f} tokens/s, Avg generation throughput: "
            f"{gen:.1f} tokens/s, Running: {stats.num_running} reqs, Waiting: "
            f"{stats.num_waiting} reqs, KV cache usage: {usage:.1f}%")


def is_idle(prev: Sample, now: Sample, stats: EngineStats) -> bool:
    return (now.prompt_tokens == prev.prompt_tokens
            and now.generation_tokens == prev.generation_tokens
            and stats.num_running == 0 and stats.num_waiting == 0)


def sample(client: EngineClient) -> Sample:
    return Sample(time.monotonic(), client.tokens.prompt, client.tokens.generation)


async def log_stats_forever(client: EngineClient, interval_s: float = DEFAULT_INTERVAL_S) -> None:
    """Log the line every `interval_s` until cancelled (a dead engine ends the loop)."""
    prev, was_idle = sample(client), False
    while True:
        await asyncio.sleep(interval_s)  # the period of a log line, not a synchronisation
        try:
            stats = await client.stats(timeout_s=min(interval_s, 5.0))
        except asyncio.TimeoutError:
            continue
        except EngineDeadError:
            return
        now = sample(client)
        idle = is_idle(prev, now, stats)
        if not (idle and was_idle):
            log.info("%s", stats_line(prev, now, stats))
        prev, was_idle = now, idle
