"""Prometheus metrics over `prometheus_client`, one registry per app.

Owns `MetricSet` (one `CollectorRegistry` per app — never the process-wide default, so several
apps in one process do not clash — in which every metric carries the `model_name` label first,
then the labels it declares), the handles call sites use (`Counter.inc`, `Gauge.set`,
`Histogram.observe`, each taking a dict of the declared labels), `MirroredCounters` (monotonic
counters kept elsewhere, e.g. in the engine process, exposed at their latest totals when
scraped), the exposition (`MetricSet.render`, `CONTENT_TYPE`) and the bucket presets.
Knows nothing of what is measured: the API server and the proxy declare their own metrics.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as _PromCounter
from prometheus_client import Gauge as _PromGauge
from prometheus_client import Histogram as _PromHistogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

_M = TypeVar("_M", _PromCounter, _PromGauge, _PromHistogram)
MODEL_LABEL = "model_name"
CONTENT_TYPE = CONTENT_TYPE_LATEST
UNKNOWN_MODEL = "unknown"  # the proxy's model_name until a backend has named its model
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000,
                       50000, 100000, 200000, 500000, 1000000)


def sanitize_name(name: str) -> str:
    """A valid metric name from an arbitrary string (non-alphanumerics become '_')."""
    out = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    return out if re.match(r"^[a-zA-Z_:]", out) else f"_{out}"


class _Handle:
    def __init__(self, owner: MetricSet, labelnames: Sequence[str]) -> None:
        self._owner, self._labelnames = owner, tuple(labelnames)
        self._nameset = frozenset(self._labelnames)
        self._children: dict[tuple[str, ...], Any] = {}  # label values -> prometheus child

    def _values(self, labels: dict[str, str] | None) -> list[str]:
        labels = labels or {}
        extra = set(labels) - set(self._labelnames)
        if extra:
            raise ValueError(f"undeclared labels {sorted(extra)}")
        return [self._owner.model_name, *(str(labels.get(n, "")) for n in self._labelnames)]

    def _child(self, metric: Any, labels: dict[str, str] | None) -> Any:
        """The labelled child, cached (prometheus_client's `labels()` validates and locks on
        every call; observations happen per token)."""
        if not labels:
            key: tuple[str, ...] = (self._owner.model_name,)
        else:
            if not self._nameset.issuperset(labels):
                self._values(labels)  # raises: undeclared labels
            key = (self._owner.model_name, *(str(labels.get(n, "")) for n in self._labelnames))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*self._values(labels))
        return child


class Counter(_Handle):
    def __init__(self, owner: MetricSet, metric: _PromCounter, labelnames: Sequence[str],
                 name: str) -> None:
        super().__init__(owner, labelnames)
        self._metric, self._sample = metric, name.removesuffix("_total") + "_total"

    def inc(self, amount: float = 1.0, labels: dict[str, str] | None = None) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._child(self._metric, labels).inc(amount)

    def value(self, labels: dict[str, str] | None = None) -> float:
        """The current total (for tests and logs)."""
        names = (MODEL_LABEL, *self._labelnames)
        got = self._owner.registry.get_sample_value(
            self._sample, dict(zip(names, self._values(labels))))
        return 0.0 if got is None else got


class Gauge(_Handle):
    def __init__(self, owner: MetricSet, metric: _PromGauge, labelnames: Sequence[str]) -> None:
        super().__init__(owner, labelnames)
        self._metric = metric

    def set(self, value: float, labels: dict[str, str] | None = None) -> None:
        self._child(self._metric, labels).set(value)


class Histogram(_Handle):
    def __init__(
        self, owner: MetricSet, metric: _PromHistogram, labelnames: Sequence[str]
    ) -> None:
        super().__init__(owner, labelnames)
        self._metric = metric

    def observe(self, value: float, labels: dict[str, str] | None = None) -> None:
        self._child(self._metric, labels).observe(value)


class MirroredCounters(Collector):
    """Counters whose totals are kept elsewhere (the engine process): `update` stores the
    latest totals, a scrape exposes each as `<prefix><name>_total` with `model_name`."""

    def __init__(self, owner: MetricSet, prefix: str, help_format: str) -> None:
        self._owner, self._prefix, self._help = owner, prefix, help_format
        self._totals: dict[str, float] = {}
        self._lock = threading.Lock()

    def update(self, totals: dict[str, float]) -> None:
        with self._lock:
            for name, value in totals.items():
                self._totals[name] = max(float(value), self._totals.get(name, 0.0))

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            items = sorted(self._totals.items())
        for name, value in items:
            family = CounterMetricFamily(self._prefix + sanitize_name(name),
                                         self._help.format(name=name), labels=[MODEL_LABEL])
            family.add_metric([self._owner.model_name], value)
            yield family


class MetricSet:
    """The metrics of one app in their own registry; `model_name` labels every sample."""

    CONTENT_TYPE = CONTENT_TYPE

    def __init__(self, model_name: str = UNKNOWN_MODEL) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        metric = _PromCounter(name, help_text, [MODEL_LABEL, *labels], registry=self.registry)
        return Counter(self, self._zero(metric, labels), labels, name)

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        metric = _PromGauge(name, help_text, [MODEL_LABEL, *labels], registry=self.registry)
        return Gauge(self, self._zero(metric, labels), labels)

    def _zero(self, metric: _M, labels: Sequence[str]) -> _M:
        """A metric without labels of its own is exposed (at 0) from the start when the model
        is known, so e.g. a decode instance shows `prompt_tokens_total 0`, not nothing."""
        if not labels and self.model_name != UNKNOWN_MODEL:
            metric.labels(self.model_name)
        return metric

    def histogram(
        self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS_S,
        labels: Sequence[str] = (),
    ) -> Histogram:
        metric = _PromHistogram(name, help_text, [MODEL_LABEL, *labels], buckets=buckets,
                                registry=self.registry)
        return Histogram(self, self._zero(metric, labels), labels)

    def mirrored_counters(self, prefix: str, help_format: str) -> MirroredCounters:
        collector = MirroredCounters(self, prefix, help_format)
        self.registry.register(collector)
        return collector

    def render(self) -> bytes:
        """The text exposition (version 0.0.4) of everything registered, without the
        `_created` series prometheus_client adds to counters and histograms (as vLLM)."""
        return generate_latest(_WithoutCreated(self.registry))  # type: ignore[arg-type]


class _WithoutCreated:
    """A view of a registry whose families leave out their `*_created` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            samples = [s for s in family.samples if not s.name.endswith("_created")]
            if samples or not family.samples:
                family.samples = samples
                yield family
