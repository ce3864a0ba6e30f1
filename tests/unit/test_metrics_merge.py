"""Several processes' metric snapshots made one (gateway/common/metrics.py): counters and
histograms summed, gauges by their merge rule; the text rendered exactly (the exchange between
workers runs in tests/e2e/test_worker_metrics.py)."""

from __future__ import annotations

from gateway.common.metrics import (
    Counter,
    Family,
    Gauge,
    Histogram,
    Merge,
    merge,
    render_families,
)
from gateway.replica.metrics import GatewayMetrics
from gateway.replica.worker_metrics import decode_snapshot, encode_snapshot
from tests.support.prometheus import samples

A = (("node", "a"),)
B = (("node", "b"),)


def worker(
    requests: dict[tuple[tuple[str, str], ...], int],
    in_flight: int,
    degraded: float,
    nodes: float,
    latency_s: float,
) -> list[Family]:
    count = Counter("x_requests_total", "Requests.")
    for labels, n in requests.items():
        count.inc(labels, n)
    flight = Gauge("x_in_flight", "In flight.")
    flight.set((), in_flight)
    flag = Gauge("x_degraded", "Degraded.", Merge.MAX)
    flag.set((), degraded)
    registry = Gauge("x_nodes", "Nodes.", Merge.LOCAL)
    registry.set((), nodes)
    histogram = Histogram("x_seconds", "Time.", (0.1, 1.0))
    histogram.observe((), latency_s)
    snapshot = [f.family() for f in (count, flight, flag, registry, histogram)]
    return decode_snapshot(encode_snapshot(snapshot))  # as a peer's arrives


def test_counters_and_histograms_sum_gauges_follow_their_rule() -> None:
    own = worker({A: 3}, in_flight=2, degraded=0, nodes=3, latency_s=0.05)
    peer = worker({A: 4, B: 1}, in_flight=1, degraded=1, nodes=4, latency_s=5.0)
    found = samples(render_families(merge([own, peer])).decode())
    assert found[("x_requests_total", frozenset(A))] == 7
    assert found[("x_requests_total", frozenset(B))] == 1
    assert found[("x_in_flight", frozenset())] == 3
    assert found[("x_degraded", frozenset())] == 1
    assert found[("x_nodes", frozenset())] == 3  # the answering worker's view
    bucket = {
        le: found[("x_seconds_bucket", frozenset({("le", le)}))] for le in ("0.1", "1", "+Inf")
    }
    assert bucket == {"0.1": 1, "1": 1, "+Inf": 2}
    assert found[("x_seconds_count", frozenset())] == 2
    assert found[("x_seconds_sum", frozenset())] == 5.05


def test_values_are_exact() -> None:
    big = Counter("x_total", "Big.")
    big.inc((), 12_345_678)
    assert list(big.render())[-1] == "x_total 12345678"  # not 1.23457e+07
    assert list(Counter("y_total", "Unused.").render())[-1] == "# TYPE y_total counter"
    fraction = Gauge("g", "A fraction.")
    fraction.set((), 0.1)
    assert list(fraction.render())[-1] == "g 0.1"


def test_one_process_renders_as_before() -> None:
    metrics = GatewayMetrics()
    metrics.requests.inc((("node", "a"), ("model", "m"), ("status", "200")))
    metrics.gauge("x_degraded", "Degraded.", lambda: [((), 0.0)], Merge.MAX)
    text = metrics.render().decode()
    found = samples(text)
    key = frozenset({("node", "a"), ("model", "m"), ("status", "200")})
    assert found[("fleetgate_requests_total", key)] == 1
    assert found[("x_degraded", frozenset())] == 0
    assert "# TYPE fleetgate_request_duration_seconds histogram" in text
    assert merge([metrics.snapshot()]) == metrics.snapshot()
