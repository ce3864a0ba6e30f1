"""Prometheus metrics of one gateway process, kept as plain counters and rendered as text.

Hand-rolled to keep the request path cheap: a counter is a dict increment. With several
workers each process exposes its own figures (scrape each, or sum by ``replica``).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    def __init__(self, name: str, help_text: str, kind: str = "counter") -> None:
        self.name, self.help, self.kind = name, help_text, kind
        self.values: defaultdict[Labels, float] = defaultdict(float)

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        self.values[labels] += amount

    def set(self, labels: Labels, value: float) -> None:
        self.values[labels] = value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(labels)} {value:g}"


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
                yield f"{self.name}_bucket{_labels(labels, le)} {running}"
            running += counts[-1]
            le_inf = 'le="+Inf"'
            yield f"{self.name}_bucket{_labels(labels, le_inf)} {running}"
            yield f"{self.name}_sum{_labels(labels)} {self.sums[labels]:.6f}"
            yield f"{self.name}_count{_labels(labels)} {running}"


def render_text(metrics: Iterable[Counter | Histogram]) -> list[str]:
    """Prometheus text lines of several metrics, in order."""
    lines: list[str] = []
    for metric in metrics:
        lines.extend(metric.render())
    return lines


class GatewayMetrics:
    """Every metric the gateway exports; gauges read live values through callbacks."""

    def __init__(self) -> None:
        self.requests = Counter(
            "fleetgate_requests_total", "Requests answered, by node, model and status code."
        )
        self.attempts = Counter(
            "fleetgate_upstream_attempts_total", "Upstream attempts by node and result."
        )
        self.retries = Counter("fleetgate_retries_total", "Requests retried on another node.")
        self.retry_budget_exhausted = Counter(
            "fleetgate_retry_budget_exhausted_total", "Retries refused by the retry budget."
        )
        self.ejections = Counter(
            "fleetgate_ejections_total", "Passive ejections this replica triggered, by node."
        )
        self.store_errors = Counter(
            "fleetgate_store_errors_total", "Store calls that failed, by operation."
        )
        self.disconnects = Counter(
            "fleetgate_client_disconnects_total", "Requests cancelled by a client disconnect."
        )
        self.stream_errors = Counter(
            "fleetgate_stream_errors_total", "Streams ended by an upstream failure midway."
        )
        self.latency = Histogram(
            "fleetgate_request_duration_seconds",
            "Whole request time through the gateway, by model.",
            LATENCY_BUCKETS_S,
        )
        self.ttfb = Histogram(
            "fleetgate_time_to_first_byte_seconds",
            "Time until the upstream answered with headers, by model.",
            LATENCY_BUCKETS_S,
        )
        self._gauges: list[tuple[str, str, Callable[[], Iterable[tuple[Labels, float]]]]] = []
        self.extra: list[Counter] = []  # counters of optional parts (DistServe)

    def gauge(
        self, name: str, help_text: str, read: Callable[[], Iterable[tuple[Labels, float]]]
    ) -> None:
        self._gauges.append((name, help_text, read))

    def render(self) -> bytes:
        lines = render_text(
            (
                self.requests,
                self.attempts,
                self.retries,
                self.retry_budget_exhausted,
                self.ejections,
                self.store_errors,
                self.disconnects,
                self.stream_errors,
                self.latency,
                self.ttfb,
                *self.extra,
            )
        )
        for name, help_text, read in self._gauges:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} gauge")
            for labels, value in read():
                lines.append(f"{name}{_labels(labels)} {value:g}")
        return ("\n".join(lines) + "\n").encode()
