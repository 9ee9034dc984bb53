"""The proxy's own metrics: request outcomes (client errors apart from backend errors),
backend errors, TTFT of every request, leg latencies, and the handover (P's first token ->
D's first token at the client) split into transfer and the rest.

Owns metric names and which backend status is whose fault (`is_client_error`); the registry
and exposition come from `hybridpd.httpkit.metrics` (every sample has `model_name`: the
model the backends' /v1/models name, `unknown` until one answered). Knows nothing of HTTP.
"""

from __future__ import annotations

import enum

from hybridpd.httpkit.metrics import MetricSet
from hybridpd.proxy.routing import Router

PREFIX = "hybridpd_proxy_"


class Outcome(str, enum.Enum):
    OK = "ok"
    FINISHED_ON_PREFILL = "finished_on_prefill"
    BACKEND_ERROR = "backend_error"  # a backend failed (5xx, unreachable, broken stream)
    CLIENT_ERROR = "client_error"  # a backend refused the request as the client's fault (4xx)
    NO_BACKEND = "no_backend"
    BAD_REQUEST = "bad_request"
    CLIENT_DISCONNECT = "client_disconnect"
    PROXY_ERROR = "proxy_error"  # a bug in the proxy (logged with its traceback)


def is_client_error(status: int) -> bool:
    """A backend's 4xx is the client's fault, except 401/403 (the deployment's own keys and
    hand-off signatures: a misconfiguration, not a bad request); 5xx are backend errors."""
    return 400 <= status < 500 and status not in (401, 403)


class ProxyMetrics:
    def __init__(self) -> None:
        r = self.metrics = MetricSet()
        self.requests = r.counter(PREFIX + "requests_total", "Client requests by outcome.",
                                  ["outcome"])
        self.backend_errors = r.counter(
            PREFIX + "backend_errors_total",
            "Failed backend calls by role (5xx, 401/403, unreachable; not the client's 4xx).",
            ["role"])
        self.backend_client_errors = r.counter(
            PREFIX + "backend_client_errors_total",
            "Backend answers that refused the client's request (4xx), by role and status.",
            ["role", "status"])
        self.ttft = r.histogram(
            PREFIX + "time_to_first_token_seconds",
            "Client request to first token: sent (streams) or known (P's answer, otherwise).",
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
        self.in_flight = r.gauge(PREFIX + "backend_in_flight", "Requests in flight per backend.",
                                 ["backend", "role"])
        self.healthy = r.gauge(PREFIX + "backend_healthy", "1 when a backend is healthy.",
                               ["backend", "role"])

    CONTENT_TYPE = MetricSet.CONTENT_TYPE

    def set_model_name(self, name: str) -> None:
        self.metrics.model_name = name

    def observe_backend_status(self, role: str, status: int) -> None:
        """One backend answer that was not 200: the client's fault or the backend's."""
        if is_client_error(status):
            self.backend_client_errors.inc(labels={"role": role, "status": str(status)})
        else:
            self.backend_errors.inc(labels={"role": role})

    def observe_prefill(self, prefill_s: float, stream: bool) -> None:
        """The P leg's duration; for a non-streaming request it is also the time to the first
        token (P's answer carries it; a stream's TTFT is observed when the chunk is sent)."""
        self.prefill_s.observe(prefill_s)
        if not stream:
            self.ttft.observe(prefill_s)

    def render(self, router: Router) -> bytes:
        for b in router.backends:
            labels = {"backend": b.url, "role": b.role.value}
            self.in_flight.set(b.in_flight, labels)
            self.healthy.set(1.0 if b.healthy else 0.0, labels)
        return self.metrics.render()
