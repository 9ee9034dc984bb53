"""Prometheus text-format metrics without an external library.

Owns `Counter`, `Gauge`, `Histogram` (labelled, cumulative buckets) and a `Registry` that renders
them in the Prometheus text exposition format (version 0.0.4). Knows nothing of what is
measured: the API server and the proxy declare their own metrics.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence

LabelKey = tuple[tuple[str, str], ...]
NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)


def sanitize_name(name: str) -> str:
    """A valid metric name from an arbitrary string (non-alphanumerics become '_')."""
    out = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    return out if NAME_RE.match(out) else f"_{out}"


def _key(labels: dict[str, str] | None) -> LabelKey:
    return tuple(sorted((k, str(v)) for k, v in (labels or {}).items()))


def _fmt_labels(key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = key + extra
    if not pairs:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')) for k, v in pairs]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str) -> None:
        if not NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name, self.help = name, help_text
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, labels: dict[str, str] | None = None) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            k = _key(labels)
            self._values[k] = self._values.get(k, 0.0) + amount

    def set_total(self, value: float, labels: dict[str, str] | None = None) -> None:
        """Mirror a monotonic counter kept elsewhere (e.g. in the engine)."""
        with self._lock:
            self._values[_key(labels)] = float(value)

    def value(self, labels: dict[str, str] | None = None) -> float:
        return self._values.get(_key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, labels: dict[str, str] | None = None) -> None:
        self.set_total(value, labels)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS_S
    ) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        # per label set: [count per bucket (non-cumulative) ..., count, sum]
        self._data: dict[LabelKey, list[float]] = {}

    def observe(self, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            row = self._data.setdefault(_key(labels), [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    row[i] += 1
                    break
            row[-2] += 1
            row[-1] += value

    def count(self, labels: dict[str, str] | None = None) -> int:
        row = self._data.get(_key(labels))
        return 0 if row is None else int(row[-2])

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        lines = self.header()
        for key, row in items:
            cum = 0.0
            for bound, n in zip(self.buckets, row):
                cum += n
                le = (("le", _fmt_value(bound)),)
                lines.append(f"{self.name}_bucket{_fmt_labels(key, le)} {_fmt_value(cum)}")
            inf = (("le", "+Inf"),)
            lines.append(f"{self.name}_bucket{_fmt_labels(key, inf)} {_fmt_value(row[-2])}")
            lines.append(f"{self.name}_count{_fmt_labels(key)} {_fmt_value(row[-2])}")
            lines.append(f"{self.name}_sum{_fmt_labels(key)} {_fmt_value(row[-1])}")
        return lines


class Registry:
    """An ordered set of metrics rendered together."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str) -> Counter:
        return self._add(Counter(name, help_text))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str) -> Gauge:
        return self._add(Gauge(name, help_text))  # type: ignore[return-value]

    def histogram(
        self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS_S
    ) -> Histogram:
        return self._add(Histogram(name, help_text, buckets))  # type: ignore[return-value]

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
