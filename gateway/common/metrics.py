"""The metric types every fleetgate process exports (counters, gauges, histograms), kept as
plain values and rendered as Prometheus text.

Hand-rolled to keep the request path cheap: a counter is a dict increment. With several
workers each process exposes its own figures (scrape each, or sum by ``replica``).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    """A value per label set that only goes up."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self.values: defaultdict[Labels, float] = defaultdict(float)

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        self.values[labels] += amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{format_labels(labels)} {value:g}"


class Gauge(Counter):
    """A value per label set that is set to what it is now."""

    kind = "gauge"

    def set(self, labels: Labels, value: float) -> None:
        self.values[labels] = value


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts: dict[Labels, list[int]] = {}
        self.sums: defaultdict[Labels, float] = defaultdict(float)

    def observe(self, labels: Labels, value: float) -> None:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.buckets) + 1)
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[labels] += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for labels, counts in sorted(self.counts.items()):
            running = 0
            for bound, count in zip(self.buckets, counts, strict=False):
                running += count
                le = f'le="{bound:g}"'
                yield f"{self.name}_bucket{format_labels(labels, le)} {running}"
            running += counts[-1]
            le_inf = 'le="+Inf"'
            yield f"{self.name}_bucket{format_labels(labels, le_inf)} {running}"
            yield f"{self.name}_sum{format_labels(labels)} {self.sums[labels]:.6f}"
            yield f"{self.name}_count{format_labels(labels)} {running}"


def render_text(metrics: Iterable[Counter | Histogram]) -> list[str]:
    """Prometheus text lines of several metrics, in order."""
    lines: list[str] = []
    for metric in metrics:
        lines.extend(metric.render())
    return lines
