"""Per-request latency records and their summary statistics (pure numbers, no I/O).

Owns `RequestResult` (what one streamed request measured), `Slo` and `summarize`: p50/p90/p99
and means of TTFT, TPOT, ITL and E2E, request and output-token throughput (also per GPU),
output tok/s per user, goodput, and the P/D phases the proxy reported (P queue + prefill,
transfer, handover, D's first token). Definitions (DESIGN.md §6): TTFT = first chunk carrying
tokens - send; ITL = every gap between consecutive token-carrying chunks; TPOT = (E2E - TTFT)
/ (output_tokens - 1), defined only for requests with at least 2 output tokens; output tok/s
per user = 1 / mean TPOT. Must not know HTTP, the OpenAI wire format or plotting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestResult:
    """One request as the client saw it; times in seconds."""

    ok: bool
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    itls_s: tuple[float, ...] = ()  # every gap between consecutive token-carrying chunks
    error: str | None = None
    token_source: str = "usage"  # where output_tokens came from: usage | token_ids | chunks
    phases: dict[str, float] = field(default_factory=dict)  # P/D phases (loadgen._Tally)

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["itls_s"] = list(self.itls_s)
        d["tpot_s"] = self.tpot_s
        return d


@dataclass(frozen=True)
class Slo:
    """Service level objective for goodput; None means no bound on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def active(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok or r.ttft_s is None:
            return False
        if self.ttft_ms is not None and r.ttft_s * 1e3 > self.ttft_ms:
            return False
        tpot = r.tpot_s
        return self.tpot_ms is None or (tpot is not None and tpot * 1e3 <= self.tpot_ms)


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles of one metric, in milliseconds."""

    count: int
    mean_ms: float | None
    percentiles_ms: dict[int, float] = field(default_factory=dict)

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, None, {})
        ms = np.asarray(values, dtype=np.float64) * 1e3  # (n,)
        return cls(int(ms.size), float(ms.mean()),
                   {p: float(np.percentile(ms, p)) for p in PERCENTILES})


@dataclass(frozen=True)
class Summary:
    """Aggregate of one run (one concurrency level)."""

    concurrency: int
    completed: int
    failed: int
    duration_s: float
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s (all requests)
    output_tps_per_user: float | None  # 1 / mean TPOT
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    goodput: float | None  # requests / s meeting the SLO (None without an SLO)
    slo_attainment: float | None  # fraction of all requests meeting the SLO
    num_gpus: int = 1
    output_throughput_per_gpu: float = 0.0
    request_rate: float | None = None  # the Poisson arrival rate (None: all at once)
    phases: dict[str, Distribution] = field(default_factory=dict)  # prefill_s, transfer_s, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: Sequence[RequestResult], duration_s: float, concurrency: int,
              slo: Slo | None = None, num_gpus: int = 1,
              request_rate: float | None = None) -> Summary:
    """Statistics of a run of `results` that took `duration_s` wall seconds."""
    done = [r for r in results if r.ok]
    tpots = [t for r in done if (t := r.tpot_s) is not None]
    out_tokens = sum(r.output_tokens for r in done)
    span = max(duration_s, 1e-9)
    mean_tpot = float(np.mean(tpots)) if tpots else None
    good = sum(slo.met_by(r) for r in results) if slo is not None and slo.active else None
    return Summary(
        concurrency=concurrency,
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=duration_s,
        total_output_tokens=out_tokens,
        request_throughput=len(done) / span,
        output_throughput=out_tokens / span,
        output_tps_per_user=(1.0 / mean_tpot) if mean_tpot else None,
        ttft=Distribution.of_seconds([r.ttft_s for r in done if r.ttft_s is not None]),
        tpot=Distribution.of_seconds(tpots),
        itl=Distribution.of_seconds([gap for r in done for gap in r.itls_s]),
        e2e=Distribution.of_seconds([r.e2e_s for r in done if r.e2e_s is not None]),
        goodput=None if good is None else good / span,
        slo_attainment=None if good is None else good / max(len(results), 1),
        num_gpus=num_gpus,
        output_throughput_per_gpu=out_tokens / span / max(num_gpus, 1),
        request_rate=request_rate,
        phases={name: Distribution.of_seconds([r.phases[name] for r in done if name in r.phases])
                for name in sorted({k for r in done for k in r.phases})},
    )
