"""Every metric a gateway replica exports, as one process's snapshot (summed over the
replica's workers by :mod:`.worker_metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gateway.common.metrics import (
    LATENCY_BUCKETS_S,
    Counter,
    Family,
    Gauge,
    Histogram,
    Labels,
    Merge,
    Series,
    render_families,
)

GaugeRead = Callable[[], Iterable[tuple[Labels, float]]]


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
        self.prefix_blocks = Counter(
            "fleetgate_prefix_blocks_total",
            "cache_aware: prompt blocks routed (kind=total), found held by the chosen node "
            "(matched), and forgotten after its engine reported fewer cached tokens (forgotten).",
        )
        self.queue_depth = Gauge(
            "fleetgate_queue_depth",
            "Requests of this replica waiting in the fleet's queue, by model and priority "
            "(summed over the replicas: the fleet's queue).",
        )
        self.admissions = Counter(
            "fleetgate_admissions_total",
            "Requests admitted to a node with a capacity: at once (how=direct) or after "
            "waiting in the fleet's queue (queued), or by this replica's own counts while the "
            "store was unreachable (local).",
        )
        self.queue_refusals = Counter(
            "fleetgate_queue_refusals_total",
            "Requests that left the fleet's queue unadmitted, by reason: full (over "
            "--max-queue), timeout (--queue-timeout), client_gone.",
        )
        self.queue_wait = Histogram(
            "fleetgate_queue_wait_seconds",
            "Time requests waited in the fleet's queue, by model.",
            LATENCY_BUCKETS_S,
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
        self._gauges: list[tuple[str, str, Merge, GaugeRead]] = []
        self.extra: list[Counter] = []  # counters of optional parts (DistServe)

    def gauge(self, name: str, help_text: str, read: GaugeRead, merge: Merge = Merge.SUM) -> None:
        """A gauge read when scraped; ``merge`` says how the workers' values add up."""
        self._gauges.append((name, help_text, merge, read))

    def snapshot(self) -> list[Family]:
        """Every metric's values now, gauges read."""
        metrics: tuple[Counter | Histogram, ...] = (
            self.requests,
            self.attempts,
            self.retries,
            self.retry_budget_exhausted,
            self.ejections,
            self.store_errors,
            self.disconnects,
            self.stream_errors,
            self.prefix_blocks,
            self.queue_depth,
            self.admissions,
            self.queue_refusals,
            self.queue_wait,
            self.latency,
            self.ttfb,
            *self.extra,
        )
        families = [metric.family() for metric in metrics]
        for name, help_text, merge, read in self._gauges:
            series = tuple(Series(labels, value) for labels, value in read())
            families.append(Family(name, help_text, "gauge", merge, series))
        return families

    def render(self) -> bytes:
        """This process's metrics as a Prometheus text page."""
        return render_families(self.snapshot())
