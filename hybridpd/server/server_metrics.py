"""The metrics an instance exposes on /metrics, and how each observation updates them.

Owns the metric names and buckets of the API server (requests, latencies, engine gauges, KV
transfer statistics, engine counters). Knows nothing of HTTP or engines beyond the plain
values it is handed.
"""

from __future__ import annotations

from typing import Any

from hybridpd.engine.protocol import EngineStats
from hybridpd.httpkit.metrics import Registry, sanitize_name

BYTES_BUCKETS = tuple(float(4**i) * 1024 for i in range(13))  # 1 KiB .. 16 GiB
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536, 262144)
GBPS_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 200, 400, 800)
PREFIX = "hybridpd_"


class ServerMetrics:
    """All metrics of one API server, in one registry."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.counter(PREFIX + "requests_total", "Finished requests by finish reason.")
        self.errors = r.counter(PREFIX + "request_errors_total", "Failed requests by HTTP status.")
        self.prompt_tokens = r.counter(PREFIX + "prompt_tokens_total", "Prompt tokens.")
        self.gen_tokens = r.counter(PREFIX + "generation_tokens_total", "Generated tokens.")
        self.ttft = r.histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.")
        self.itl = r.histogram(PREFIX + "inter_token_latency_seconds", "Inter-token latency.")
        self.e2e = r.histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end latency.")
        self.running = r.gauge(PREFIX + "num_requests_running", "Requests running in the engine.")
        self.waiting = r.gauge(PREFIX + "num_requests_waiting", "Requests waiting in the engine.")
        self.free_blocks = r.gauge(PREFIX + "pool_free_blocks", "Free blocks in the page pool.")
        self.used_blocks = r.gauge(PREFIX + "pool_used_blocks", "Used blocks in the page pool.")
        self.healthy = r.gauge(PREFIX + "engine_healthy", "1 when the engine process is alive.")
        self.xfer_bytes = r.histogram(
            PREFIX + "kv_transfer_bytes", "Bytes per KV transfer.", BYTES_BUCKETS
        )
        self.xfer_descs = r.histogram(
            PREFIX + "kv_transfer_descriptors", "Descriptors per KV transfer.", COUNT_BUCKETS
        )
        self.xfer_secs = r.histogram(PREFIX + "kv_transfer_seconds", "Seconds per KV transfer.")
        self.xfer_gbps = r.histogram(
            PREFIX + "kv_transfer_gbps", "GB/s per KV transfer.", GBPS_BUCKETS
        )
        self.xfer_outcomes = r.counter(
            PREFIX + "kv_transfer_outcomes_total", "KV transfers by outcome."
        )
        self.peer_gbps = r.gauge(
            PREFIX + "kv_peer_bandwidth_gbps",
            "Calibrated READ bandwidth per P->D pair (GB/s), by peer, transport and topology.",
        )

    def observe_finish(self, reason: str, prompt_tokens: int, gen_tokens: int) -> None:
        self.requests.inc(labels={"finish_reason": reason})
        self.prompt_tokens.inc(prompt_tokens)
        self.gen_tokens.inc(gen_tokens)

    def observe_client_abort(self) -> None:
        self.requests.inc(labels={"finish_reason": "abort"})

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
        self.free_blocks.set(stats.pool_free_blocks)
        self.used_blocks.set(stats.pool_total_blocks - stats.pool_free_blocks)
        for name, value in stats.counters.items():
            metric_name = PREFIX + "engine_" + sanitize_name(name) + "_total"
            metric = self.registry.get(metric_name)
            if metric is None:
                metric = self.registry.counter(metric_name, f"Engine counter {name}.")
            metric.set_total(value)  # type: ignore[attr-defined]


def _num(stats: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = stats.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None
