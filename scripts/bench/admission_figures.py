"""The admission benchmark's figures (scripts/bench_admission.py): one run of a set-up summed up
from the outcomes of its requests, the nodes' ``/sim/stats`` and the gateways' ``/metrics``,
and the medians over runs.

Windows: the backlogged state is [``warmup_s``, ``duration_s``) after the start: the client
loops have filled the queue by then and send until its end. Throughput counts the answers that
ended in it; TTFT and queue waits the requests sent in it; the nodes' idle gaps the arrivals in
it. What became of requests (sent, answered, refused, lost) counts the whole run.

An idle gap is how long a freed slot of a node stood idle before a request took it again (the
node's own record, ``[arrival wall time, ms, requests running]``). The gaps of slots waiting
requests may take are those whose arrival found fewer requests running than normal priority
may fill (``open_below``): a slot kept for high priority idles by design.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from scripts.bench.admission_load import Outcome
from scripts.bench.admission_workload import HIGH, KEYS
from scripts.bench.figures import quantile

BIN_S = 2.0
SAMPLES = 4
NUMERIC = (
    "sent",
    "answered",
    "refused_429",
    "refused_503",
    "lost",
    "throughput_a",
    "throughput_b",
    "throughput_ratio",
    "queued_share_a",
    "queued_share_b",
    "high_sent",
    "high_answered",
    "high_ttft_p50_ms",
    "high_ttft_p90_ms",
    "high_queue_wait_p90_ms",
    "queue_wait_p50_ms",
    "queue_wait_p90_ms",
    "queue_wait_p99_ms",
    "peak_max",
    "gap_count",
    "gap_p50_ms",
    "gap_p99_ms",
    "open_gap_count",
    "open_gap_p50_ms",
    "open_gap_p99_ms",
    "served_by_nodes",
    "depth_mean",
)
GATEWAY_COUNTERS = {
    ("fleetgate_admissions_total", "how"): "admitted",
    ("fleetgate_queue_refusals_total", "reason"): "queue_refused",
}


def ratio(values: Sequence[float]) -> float:
    """The largest over the smallest of ``values`` (NaN if one is missing or zero)."""
    if not values or any(math.isnan(v) for v in values) or min(values) <= 0:
        return math.nan
    return max(values) / min(values)


def throughput(outcomes: Iterable[Outcome], key: str, lo: float, hi: float) -> float:
    """Answers of ``key`` per second that ended in [lo, hi)."""
    done = sum(1 for o in outcomes if o.key == key and o.ok and lo <= o.done < hi)
    return done / (hi - lo) if hi > lo else math.nan


def series(
    outcomes: Iterable[Outcome], key: str, span_s: float, bin_s: float = BIN_S
) -> list[float]:
    """Answers of ``key`` per second in consecutive bins of ``bin_s`` over [0, span_s)."""
    counts = [0] * max(1, math.ceil(span_s / bin_s))
    for o in outcomes:
        if o.key == key and o.ok and 0 <= o.done < len(counts) * bin_s:
            counts[int(o.done // bin_s)] += 1
    return [c / bin_s for c in counts]


def gap_figures(
    gaps: Iterable[Sequence[float]], lo_wall: float, hi_wall: float, open_below: int
) -> dict[str, float]:
    """Count, p50 and p99 (ms) of the idle gaps that ended in [lo_wall, hi_wall): all of them,
    and those of slots open to normal priority (fewer than ``open_below`` running)."""
    kept = [(g[1], g[2]) for g in gaps if lo_wall <= g[0] < hi_wall]
    every = [ms for ms, _ in kept]
    opened = [ms for ms, running in kept if running < open_below]
    return {
        "gap_count": float(len(every)),
        "gap_p50_ms": quantile(every, 0.5),
        "gap_p99_ms": quantile(every, 0.99),
        "open_gap_count": float(len(opened)),
        "open_gap_p50_ms": quantile(opened, 0.5),
        "open_gap_p99_ms": quantile(opened, 0.99),
    }


def gateway_counts(pages: Iterable[str]) -> dict[str, float]:
    """Admissions by how and queue refusals by reason, added up over the replicas' pages."""
    out: dict[str, float] = {}
    for page in pages:
        for line in page.splitlines():
            name, _, rest = line.partition("{")
            for (metric, label), prefix in GATEWAY_COUNTERS.items():
                marker = f'{label}="'
                if name == metric and marker in rest:
                    value = rest.split(marker, 1)[1].split('"', 1)[0]
                    try:
                        number = float(line.rpartition(" ")[2])
                    except ValueError:
                        continue
                    out[f"{prefix}_{value}"] = out.get(f"{prefix}_{value}", 0.0) + number
    return out


def _kind(o: Outcome) -> str:
    if math.isnan(o.done):
        return "never ended"
    return o.error or f"HTTP {o.status} without Retry-After"


def summarize_run(
    outcomes: Sequence[Outcome],
    window: tuple[float, float],
    stats: dict[str, dict[str, Any]],
    *,
    wall0: float,
    open_below: int,
    pages: Sequence[str] = (),
    samples: Sequence[tuple[float, float]] = (),
) -> dict[str, Any]:
    """The figures of one run (see the module's docstring): ``stats`` are the nodes'
    ``/sim/stats`` by name after the run, ``pages`` the gateways' ``/metrics``, ``samples``
    the queue depth over time, ``wall0`` the wall-clock time of the run's start."""
    lo, hi = window
    fates = Counter(o.fate for o in outcomes)
    refused = Counter(o.status for o in outcomes if o.fate == "refused")
    lost = [o for o in outcomes if o.fate == "lost"]
    measured = [o for o in outcomes if lo <= o.sent < hi and o.ok]
    normal = [o for o in measured if o.key != HIGH]
    high = [o for o in measured if o.key == HIGH]
    waits = [o.queued_ms or 0.0 for o in normal]
    out: dict[str, Any] = {
        "sent": float(len(outcomes)),
        "answered": float(fates["answered"]),
        "refused_429": float(refused[429]),
        "refused_503": float(refused[503]),
        "lost": float(len(lost)),
        "lost_kinds": dict(Counter(_kind(o) for o in lost)),
        "lost_samples": [f"{o.key}: {_kind(o)}: {o.detail}" for o in lost][:SAMPLES],
        "by_key": {
            key: {
                "sent": sum(1 for o in outcomes if o.key == key),
                "answered": sum(1 for o in outcomes if o.key == key and o.ok),
            }
            for key in (*KEYS, HIGH)
        },
        "high_sent": float(sum(1 for o in outcomes if o.key == HIGH and lo <= o.sent < hi)),
        "high_answered": float(len(high)),
        "high_ttft_p50_ms": quantile([o.ttft * 1000 for o in high], 0.5),
        "high_ttft_p90_ms": quantile([o.ttft * 1000 for o in high], 0.9),
        "high_queue_wait_p90_ms": quantile([o.queued_ms or 0.0 for o in high], 0.9),
        "queue_wait_p50_ms": quantile(waits, 0.5),
        "queue_wait_p90_ms": quantile(waits, 0.9),
        "queue_wait_p99_ms": quantile(waits, 0.99),
        "peaks": {name: s.get("peak", 0) for name, s in stats.items()},
        "peak_max": float(max((s.get("peak", 0) for s in stats.values()), default=0)),
        "served_by_nodes": float(sum(s.get("served", 0) for s in stats.values())),
        "gateway": gateway_counts(pages),
        "depth": [list(s) for s in samples],
        "depth_mean": statistics.fmean([d for t, d in samples if lo <= t < hi] or [math.nan]),
    }
    for key in KEYS:
        out[f"throughput_{key}"] = throughput(outcomes, key, lo, hi)
        mine = [o for o in normal if o.key == key]
        queued = sum(1 for o in mine if o.queued_ms is not None)
        out[f"queued_share_{key}"] = queued / len(mine) if mine else math.nan
    out["throughput_ratio"] = ratio([out[f"throughput_{key}"] for key in KEYS])
    gaps = [g for s in stats.values() for g in s.get("idle_gaps", [])]
    out.update(gap_figures(gaps, wall0 + lo, wall0 + hi, open_below))
    span = max([hi, *(o.done for o in outcomes if o.ok)])
    out["series"] = {key: series(outcomes, key, span) for key in (*KEYS, HIGH)}
    return out


def _median(values: Iterable[float]) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def median_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median over runs of each figure (NaN runs left out), the highest node peak of any
    run, requests lost and refused added up, and the throughput series' median per bin."""
    out: dict[str, Any] = {key: _median(r[key] for r in runs) for key in NUMERIC}
    out["peak_max_any_run"] = max((r["peak_max"] for r in runs), default=math.nan)
    for key in ("lost", "refused_429", "refused_503", "sent"):
        out[f"{key}_total"] = sum(r[key] for r in runs)
    kinds: Counter[str] = Counter()
    for r in runs:
        kinds.update(r["lost_kinds"])
    out["lost_kinds_total"] = dict(kinds)
    out["lost_samples"] = [s for r in runs for s in r["lost_samples"]][:SAMPLES]
    out["series"] = {}
    for key in runs[0]["series"] if runs else ():
        bins = max(len(r["series"][key]) for r in runs)
        out["series"][key] = [
            _median(r["series"][key][i] for r in runs if i < len(r["series"][key]))
            for i in range(bins)
        ]
    return out
