"""The metric types every fleetgate process exports (counters, gauges, histograms), kept as
plain values and rendered as Prometheus text.

Hand-rolled to keep the request path cheap: a counter is a dict increment (about 1 µs of CPU
for a request's five updates, against 13 µs with ``prometheus_client``'s multiprocess mode: see
``scripts/bench_metrics.py`` and the README). Each metric can give a :class:`Family`, a
snapshot of its values that several processes' snapshots merge into one (:func:`merge`): a
gateway replica with several workers sums its workers' figures that way.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import msgspec

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

Labels = tuple[tuple[str, str], ...]


class Merge(enum.Enum):
    """How the values of one series in several processes make one value."""

    SUM = "sum"  # counters, histograms, and gauges of what each process holds (in flight)
    MAX = "max"  # a flag any process may raise (degraded)
    LOCAL = "local"  # the same in every process (a view of shared state): the answering one's


class Series(msgspec.Struct, array_like=True, frozen=True):
    """One label set's value: a counter's or gauge's value, or a histogram's sum with its
    count per bucket (not cumulative; the last one is +Inf's)."""

    labels: Labels
    value: float
    buckets: tuple[int, ...] = ()


class Family(msgspec.Struct, array_like=True, frozen=True):
    """A snapshot of one metric: what it is and its series."""

    name: str
    help: str
    kind: str  # "counter", "gauge" or "histogram"
    merge: Merge
    series: tuple[Series, ...]
    bounds: tuple[float, ...] = ()  # a histogram's bucket upper bounds, +Inf left out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def format_value(value: float) -> str:
    """A sample value, exact: ``:g`` would round a counter past 999,999 to 6 digits."""
    value = float(value)  # an int given where a float is due
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() else repr(value)


class Counter:
    """A value per label set that only goes up."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self.values: defaultdict[Labels, float] = defaultdict(float)
        self.merge = Merge.SUM

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        self.values[labels] += amount

    def family(self) -> Family:
        series = tuple(Series(labels, value) for labels, value in sorted(self.values.items()))
        return Family(self.name, self.help, self.kind, self.merge, series)

    def render(self) -> Iterable[str]:
        return render_family(self.family())


class Gauge(Counter):
    """A value per label set that is set to what it is now; ``merge`` says how several
    processes' values add up."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, merge: Merge = Merge.SUM) -> None:
        super().__init__(name, help_text)
        self.merge = merge

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

    def family(self) -> Family:
        series = tuple(
            Series(labels, self.sums[labels], tuple(counts))
            for labels, counts in sorted(self.counts.items())
        )
        return Family(self.name, self.help, "histogram", Merge.SUM, series, self.buckets)

    def render(self) -> Iterable[str]:
        return render_family(self.family())


def render_family(family: Family) -> Iterable[str]:
    """The Prometheus text lines of one metric."""
    name = family.name
    yield f"# HELP {name} {family.help}"
    yield f"# TYPE {name} {family.kind}"
    if family.kind != "histogram":
        for series in family.series:
            yield f"{name}{format_labels(series.labels)} {format_value(series.value)}"
        return
    for series in family.series:
        running = 0
        for bound, count in zip(family.bounds, series.buckets, strict=False):
            running += count
            le = f'le="{bound:g}"'
            yield f"{name}_bucket{format_labels(series.labels, le)} {running}"
        running += series.buckets[-1]
        le_inf = 'le="+Inf"'
        yield f"{name}_bucket{format_labels(series.labels, le_inf)} {running}"
        yield f"{name}_sum{format_labels(series.labels)} {series.value:.6f}"
        yield f"{name}_count{format_labels(series.labels)} {running}"


def render_text(metrics: Iterable[Counter | Histogram]) -> list[str]:
    """Prometheus text lines of several metrics, in order."""
    lines: list[str] = []
    for metric in metrics:
        lines.extend(metric.render())
    return lines


def render_families(families: Iterable[Family]) -> bytes:
    """A whole Prometheus text page."""
    lines = [line for family in families for line in render_family(family)]
    return ("\n".join(lines) + "\n").encode()


def merge(snapshots: Sequence[Sequence[Family]]) -> list[Family]:
    """Several processes' snapshots as one: counters and histograms summed series by series,
    gauges by their :class:`Merge`; the first snapshot is the answering process's (what a
    ``LOCAL`` gauge shows). Families keep their first order."""
    order: dict[str, Family] = {}
    values: dict[str, dict[Labels, Series]] = {}
    for index, snapshot in enumerate(snapshots):
        for family in snapshot:
            first = order.setdefault(family.name, family)
            merged = values.setdefault(family.name, {})
            if first.merge is Merge.LOCAL and index > 0:
                continue
            for series in family.series:
                held = merged.get(series.labels)
                merged[series.labels] = (
                    series if held is None else _combine(first.merge, held, series)
                )
    return [
        msgspec.structs.replace(family, series=tuple(v for _, v in sorted(values[name].items())))
        for name, family in order.items()
    ]


def _combine(how: Merge, held: Series, new: Series) -> Series:
    if how is Merge.MAX:
        return held if held.value >= new.value else new
    # Every process runs the same code, so a histogram's buckets are the same everywhere.
    buckets = tuple(a + b for a, b in zip(held.buckets, new.buckets, strict=True))
    return Series(held.labels, held.value + new.value, buckets)
