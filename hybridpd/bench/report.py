"""Human and machine output of benchmark runs: a text table, a JSON file, the Pareto plot.

Owns the presentation of `Summary` objects, and reading result files back for the plot
(`load_curves`: one curve per file, labelled by its config's `label` or the file name; output
tok/s per GPU against output tok/s per user, one point per concurrency or rate). matplotlib is
optional (the `bench` extra): the plots return False with a message when it is not
installed. Must not know HTTP or how numbers were measured.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybridpd.bench.metrics import Distribution, RequestResult, Summary


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _dist_line(name: str, d: Distribution, width: int = 5) -> str:
    p = d.percentiles_ms
    return (f"  {name:<{width}} mean {_ms(d.mean_ms):>9}  p50 {_ms(p.get(50)):>9}  "
            f"p90 {_ms(p.get(90)):>9}  p99 {_ms(p.get(99)):>9}  (ms, n={d.count})")


PHASE_NAMES = {"prefill_s": "P queue+prefill", "transfer_s": "transfer",  # display order
               "handover_s": "handover", "d_first_token_s": "D first token",
               "decode_s": "D leg"}


def format_summary(s: Summary) -> str:
    per_user = "-" if s.output_tps_per_user is None else f"{s.output_tps_per_user:.2f}"
    rate = "" if s.request_rate is None else f", {s.request_rate:g} req/s Poisson"
    lines = [
        f"concurrency {s.concurrency}{rate}: {s.completed} ok, {s.failed} failed in "
        f"{s.duration_s:.2f} s",
        f"  requests/s {s.request_throughput:.3f}   output tok/s {s.output_throughput:.2f}   "
        f"per GPU ({s.num_gpus}) {s.output_throughput_per_gpu:.2f}   "
        f"output tok/s per user {per_user}",
        _dist_line("TTFT", s.ttft),
        _dist_line("TPOT", s.tpot),
        _dist_line("ITL", s.itl),
        _dist_line("E2E", s.e2e),
    ]
    order = [k for k in PHASE_NAMES if k in s.phases] + sorted(set(s.phases) - set(PHASE_NAMES))
    if order:
        lines.append("  P/D phases (proxy pd_timing):")
    for key in order:
        lines.append("  " + _dist_line(PHASE_NAMES.get(key, key), s.phases[key], width=16))
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
    points = [(s.output_tps_per_user, s.output_throughput / num_gpus, f"c={s.concurrency}")
              for s in summaries if s.output_tps_per_user is not None]
    return plot_pareto(path, [("this run", points)])


Curve = tuple[str, list[tuple[float, float, str]]]  # label, (per user, per GPU, point label)


def load_curves(paths: Sequence[str | Path]) -> list[Curve]:
    """One curve per result file written by `write_json` (ValueError on a foreign file)."""
    curves = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
            label = doc["config"].get("label") or Path(path).stem
            runs = [r["summary"] for r in doc["runs"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path} is not a `hybridpd bench --json` result: {exc}") from None
        points = []
        for s in runs:
            if s.get("output_tps_per_user") is None:
                continue
            gpus = max(int(s.get("num_gpus") or doc["config"].get("num_gpus") or 1), 1)
            per_gpu = s.get("output_throughput_per_gpu") or s["output_throughput"] / gpus
            tag = f"c={s['concurrency']}" if s.get("request_rate") is None else \
                f"{s['request_rate']:g}/s"
            points.append((float(s["output_tps_per_user"]), float(per_gpu), tag))
        curves.append((str(label), points))
    return curves


def plot_pareto(path: str | Path, curves: Sequence[Curve]) -> bool:
    """The headline plot: output tok/s per GPU vs output tok/s per user, one curve each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path}")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves:
        pts = sorted(points)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", label=label)
        for x, y, tag in pts:
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if len(curves) > 1:
        ax.legend()
    ax.set_xlabel("output tok/s per user")
    ax.set_ylabel("output tok/s per GPU")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
