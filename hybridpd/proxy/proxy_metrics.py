"""The proxy's own metrics: request outcomes, backend errors, TTFT, leg latencies, and the
handover (P's first token -> D's first token at the client) split into transfer and the rest.

Owns metric names only (rendering comes from `hybridpd.httpkit.metrics`). Knows nothing of HTTP.
"""

from __future__ import annotations

import enum

from hybridpd.httpkit.metrics import Registry
from hybridpd.proxy.routing import Router

PREFIX = "hybridpd_proxy_"


class Outcome(str, enum.Enum):
    OK = "ok"
    FINISHED_ON_PREFILL = "finished_on_prefill"
    BACKEND_ERROR = "backend_error"
    NO_BACKEND = "no_backend"
    BAD_REQUEST = "bad_request"
    CLIENT_DISCONNECT = "client_disconnect"
    PROXY_ERROR = "proxy_error"  # a bug in the proxy (logged with its traceback)


class ProxyMetrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.counter(PREFIX + "requests_total", "Client requests by outcome.")
        self.backend_errors = r.counter(
            PREFIX + "backend_errors_total", "Failed backend calls by role."
        )
        self.ttft = r.histogram(
            PREFIX + "time_to_first_token_seconds",
            "Client request to first token sent (streaming requests).",
        )
        self.e2e = r.histogram(PREFIX + "e2e_request_latency_seconds", "Client request to end.")
        self.prefill_s = r.histogram(PREFIX + "prefill_leg_seconds", "Duration of the P leg.")
        self.handover_s = r.histogram(  # the documented handover figure (docs/architecture.md)
            PREFIX + "handover_seconds",
            "Streaming P/D: P's first token sent to the client -> D's first token relayed.",
        )
        self.handover_transfer_s = r.histogram(
            PREFIX + "handover_transfer_seconds",
            "The KV transfer inside the handover (D's kv_transfer_stats.seconds).",
        )
        self.handover_rest_s = r.histogram(
            PREFIX + "handover_rest_seconds",
            "The handover minus the transfer: D's leg setup, admission, first decode step.",
        )
        self.in_flight = r.gauge(PREFIX + "backend_in_flight", "Requests in flight per backend.")
        self.healthy = r.gauge(PREFIX + "backend_healthy", "1 when a backend is healthy.")

    def render(self, router: Router) -> str:
        for b in router.backends:
            labels = {"backend": b.url, "role": b.role.value}
            self.in_flight.set(b.in_flight, labels)
            self.healthy.set(1.0 if b.healthy else 0.0, labels)
        return self.registry.render()
