"""Human and machine output of benchmark runs: a text table, a JSON file, an optional plot.

Owns the presentation of `Summary` objects. matplotlib is optional: `plot_sweep` returns False
with a message when it is not installed. Must not know HTTP or how numbers were measured.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybridpd.bench.metrics import Distribution, RequestResult, Summary


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _dist_line(name: str, d: Distribution) -> str:
    p = d.percentiles_ms
    return (f"  {name:<5} mean {_ms(d.mean_ms):>9}  p50 {_ms(p.get(50)):>9}  "
            f"p90 {_ms(p.get(90)):>9}  p99 {_ms(p.get(99)):>9}  (ms, n={d.count})")


def format_summary(s: Summary) -> str:
    per_user = "-" if s.output_tps_per_user is None else f"{s.output_tps_per_user:.2f}"
    lines = [
        f"concurrency {s.concurrency}: {s.completed} ok, {s.failed} failed in {s.duration_s:.2f} s",
        f"  requests/s {s.request_throughput:.3f}   output tok/s {s.output_throughput:.2f}   "
        f"output tok/s per user {per_user}",
        _dist_line("TTFT", s.ttft),
        _dist_line("TPOT", s.tpot),
        _dist_line("ITL", s.itl),
        _dist_line("E2E", s.e2e),
    ]
    if s.goodput is not None:
        lines.append(f"  goodput {s.goodput:.3f} req/s (SLO met by {s.slo_attainment:.1%})")
    return "\n".join(lines)


def write_json(path: str | Path, config: dict[str, Any],
               runs: Sequence[tuple[Summary, Sequence[RequestResult]]]) -> None:
    doc = {
        "config": config,
        "runs": [{"summary": s.to_dict(), "requests": [r.to_dict() for r in rs]}
                 for s, rs in runs],
    }
    Path(path).write_text(json.dumps(doc, indent=2))


def plot_sweep(path: str | Path, summaries: Sequence[Summary], num_gpus: int = 1) -> bool:
    """Output tok/s per GPU vs output tok/s per user, one point per concurrency level."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path}")
        return False
    points = [s for s in summaries if s.output_tps_per_user is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [s.output_tps_per_user for s in points]
    ys = [s.output_throughput / num_gpus for s in points]
    ax.plot(xs, ys, marker="o")
    for s, x, y in zip(points, xs, ys):
        ax.annotate(f"c={s.concurrency}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("output tok/s per user")
    ax.set_ylabel("output tok/s per GPU")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
