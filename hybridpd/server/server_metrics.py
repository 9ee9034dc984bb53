"""The metrics an instance exposes on /metrics, and how each observation updates them.

Owns the metric names and buckets of the API server — vLLM's set under the `hybridpd_` prefix
(the one-to-one table is in docs/architecture.md, "Metrics"), each with `model_name` — plus
KV-transfer statistics and the engine's own counters, and `RequestObserver`, which turns one
request's deltas into latency and token observations. P/D counting: the instance that ran
the prefill counts the prompt (P; D counts no prompt tokens of a `do_remote_prefill` request),
each instance counts the tokens its own engine sampled (P the first token in first-token mode,
D the rest), so the sums over all instances count every token once. Engine values (running,
waiting, pool, counters) live in the engine process; they reach this registry through
`EngineClient.stats()`, asked when /metrics is scraped (`observe_engine`). Knows nothing of
HTTP or engines beyond the plain values it is handed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from hybridpd.disagg.handoff import Handoff, RemotePrefill
from hybridpd.engine.protocol import EngineStats
from hybridpd.httpkit.metrics import TOKEN_COUNT_BUCKETS, MetricSet

BYTES_BUCKETS = tuple(float(4**i) * 1024 for i in range(13))  # 1 KiB .. 16 GiB
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536, 262144)
GBPS_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 200, 400, 800)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                  0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
PREFIX = "hybridpd_"
PREEMPTION_COUNTER = "requests_preempted"  # the engine's name for vLLM's num_preemptions
# our metric -> vLLM's (docs/architecture.md, "Metrics", has the same table with the notes)
VLLM_EQUIVALENTS = {
    PREFIX + "num_requests_running": "vllm:num_requests_running",
    PREFIX + "num_requests_waiting": "vllm:num_requests_waiting",
    PREFIX + "kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    PREFIX + "num_preemptions_total": "vllm:num_preemptions_total",
    PREFIX + "prompt_tokens_total": "vllm:prompt_tokens_total",
    PREFIX + "generation_tokens_total": "vllm:generation_tokens_total",
    PREFIX + "requests_total": "vllm:request_success_total",
    PREFIX + "request_prompt_tokens": "vllm:request_prompt_tokens",
    PREFIX + "request_generation_tokens": "vllm:request_generation_tokens",
    PREFIX + "time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    PREFIX + "inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    PREFIX + "request_time_per_output_token_seconds":
        "vllm:request_time_per_output_token_seconds",
    PREFIX + "e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    PREFIX + "request_decode_time_seconds": "vllm:request_decode_time_seconds",
    PREFIX + "request_queue_time_seconds": "vllm:request_queue_time_seconds",
}


class ServerMetrics:
    """All metrics of one API server, in one registry of its own."""

    def __init__(self, model_name: str = "unknown") -> None:
        m = self.metrics = MetricSet(model_name)
        self.requests = m.counter(PREFIX + "requests_total", "Finished requests by finish reason.",
                                  ["finish_reason"])
        self.errors = m.counter(PREFIX + "request_errors_total", "Failed requests by HTTP status.",
                                ["status"])
        self.prompt_tokens = m.counter(
            PREFIX + "prompt_tokens_total",
            "Prompt tokens prefilled here (not counted by a decode instance for P/D requests).")
        self.gen_tokens = m.counter(PREFIX + "generation_tokens_total",
                                    "Tokens sampled by this instance's engine.")
        self.req_prompt_tokens = m.histogram(
            PREFIX + "request_prompt_tokens", "Prompt tokens per finished request.",
            TOKEN_COUNT_BUCKETS)
        self.req_gen_tokens = m.histogram(
            PREFIX + "request_generation_tokens",
            "Tokens this instance generated per finished request.", TOKEN_COUNT_BUCKETS)
        self.ttft = m.histogram(PREFIX + "time_to_first_token_seconds",
                                "Request received -> first token out of the engine.")
        self.itl = m.histogram(PREFIX + "inter_token_latency_seconds",
                               "Time between consecutive engine outputs of a request.",
                               TPOT_BUCKETS_S)
        self.tpot = m.histogram(
            PREFIX + "request_time_per_output_token_seconds",
            "Per request: (last token - first token) / (output tokens - 1).", TPOT_BUCKETS_S)
        self.e2e = m.histogram(PREFIX + "e2e_request_latency_seconds",
                               "Request received -> finished.")
        self.queue_time = m.histogram(
            PREFIX + "request_queue_time_seconds",
            "Per request: engine arrival -> first scheduled (on D: until its READ starts).")
        self.decode_time = m.histogram(PREFIX + "request_decode_time_seconds",
                                       "Per request: first token -> last token.")
        self.running = m.gauge(PREFIX + "num_requests_running", "Requests running in the engine.")
        self.waiting = m.gauge(PREFIX + "num_requests_waiting", "Requests waiting in the engine.")
        self.kv_usage = m.gauge(PREFIX + "kv_cache_usage_perc",
                                "Fraction of the page pool in use (0-1), KV and Mamba state.")
        self.free_blocks = m.gauge(PREFIX + "pool_free_blocks", "Free blocks in the page pool.")
        self.used_blocks = m.gauge(PREFIX + "pool_used_blocks", "Used blocks in the page pool.")
        self.healthy = m.gauge(PREFIX + "engine_healthy", "1 when the engine process is alive.")
        self.xfer_bytes = m.histogram(
            PREFIX + "kv_transfer_bytes", "Bytes per KV transfer.", BYTES_BUCKETS
        )
        self.xfer_descs = m.histogram(
            PREFIX + "kv_transfer_descriptors", "Descriptors per KV transfer.", COUNT_BUCKETS
        )
        self.xfer_secs = m.histogram(PREFIX + "kv_transfer_seconds", "Seconds per KV transfer.")
        self.xfer_gbps = m.histogram(
            PREFIX + "kv_transfer_gbps", "GB/s per KV transfer.", GBPS_BUCKETS
        )
        self.xfer_outcomes = m.counter(
            PREFIX + "kv_transfer_outcomes_total", "KV transfers by outcome.", ["outcome"]
        )
        self.peer_gbps = m.gauge(
            PREFIX + "kv_peer_bandwidth_gbps",
            "Calibrated READ bandwidth per P->D pair (GB/s), by peer, transport and topology.",
            ["peer", "transport", "topology"],
        )
        self.preemptions = m.mirrored_counters(PREFIX, "Requests preempted by the scheduler.")
        self.engine_counters = m.mirrored_counters(PREFIX + "engine_", "Engine counter {name}.")

    CONTENT_TYPE = MetricSet.CONTENT_TYPE

    def render(self) -> bytes:
        return self.metrics.render()

    def observe_finish(self, reason: str, prompt_tokens: int, gen_tokens: int,
                       count_prompt: bool = True) -> None:
        self.requests.inc(labels={"finish_reason": reason})
        if count_prompt:
            self.prompt_tokens.inc(prompt_tokens)
            self.req_prompt_tokens.observe(prompt_tokens)
        self.gen_tokens.inc(gen_tokens)
        self.req_gen_tokens.observe(gen_tokens)

    def observe_client_abort(self) -> None:
        self.requests.inc(labels={"finish_reason": "abort"})

    def observer(self, hand_off: Handoff | None, start: float) -> RequestObserver:
        """The observer of one request that arrived at `start` (monotonic seconds)."""
        remote_prefill = isinstance(hand_off, RemotePrefill)  # P counted the prompt
        return RequestObserver(self, start, count_prompt=not remote_prefill)

    def observe_transfer(self, stats: dict[str, Any]) -> None:
        """One decode-side transfer; tolerant of the keys the engine chose to fill."""
        self.xfer_outcomes.inc(labels={"outcome": str(stats.get("outcome", "ok"))})
        nbytes = _num(stats, "bytes", "num_bytes")
        secs = _num(stats, "seconds", "duration_s")
        descs = _num(stats, "descriptors", "num_descriptors")
        gbps = _num(stats, "gbps", "gb_per_s")
        if gbps is None and nbytes is not None and secs:
            gbps = nbytes / secs / 1e9
        for hist, value in (
            (self.xfer_bytes, nbytes), (self.xfer_secs, secs),
            (self.xfer_descs, descs), (self.xfer_gbps, gbps),
        ):
            if value is not None:
                hist.observe(value)
        calibrated = _num(stats, "calibrated_gbps")
        if calibrated is not None and stats.get("transport"):
            self.peer_gbps.set(calibrated, {
                "peer": str(stats.get("peer", "")), "transport": str(stats["transport"]),
                "topology": str(stats.get("topology", "unknown"))})

    def observe_engine(self, stats: EngineStats | None, healthy: bool) -> None:
        self.healthy.set(1.0 if healthy else 0.0)
        if stats is None:
            return
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        used = stats.pool_total_blocks - stats.pool_free_blocks
        self.free_blocks.set(stats.pool_free_blocks)
        self.used_blocks.set(used)
        self.kv_usage.set(used / stats.pool_total_blocks if stats.pool_total_blocks else 0.0)
        self.preemptions.update(
            {"num_preemptions": stats.counters.get(PREEMPTION_COUNTER, 0.0)})
        self.engine_counters.update(stats.counters)


@dataclass
class RequestObserver:
    """Latency and token bookkeeping of one request (monotonic seconds); `observe` is fed
    each delta's arrival time, token count and (on the last one) its finish reason."""

    metrics: ServerMetrics
    start: float
    count_prompt: bool = True
    first: float | None = None
    last: float | None = None
    n_tokens: int = 0

    def observe(self, at: float, n_new: int, finish_reason: str | None,
                num_prompt_tokens: int, transfer_stats: dict[str, Any] | None,
                queued_s: float | None = None) -> None:
        m = self.metrics
        if queued_s is not None:
            m.queue_time.observe(queued_s)
        if n_new:
            if self.first is None:
                self.first = at
                m.ttft.observe(at - self.start)
            elif self.last is not None:
                m.itl.observe(at - self.last)
            self.last = at
            self.n_tokens += n_new
        if transfer_stats:
            m.observe_transfer(transfer_stats)
        if finish_reason is None:
            return
        m.e2e.observe(time.monotonic() - self.start)
        if self.first is not None and self.last is not None:
            m.decode_time.observe(self.last - self.first)
            if self.n_tokens > 1:
                m.tpot.observe((self.last - self.first) / (self.n_tokens - 1))
        m.observe_finish(finish_reason, num_prompt_tokens, self.n_tokens, self.count_prompt)


def _num(stats: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = stats.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None
