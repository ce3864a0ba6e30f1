"""Figures of measured requests: quantiles, one run's summary, the median of several runs."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from scripts.bench.load import Result

ERROR_SAMPLES = 4
NUMERIC = (
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "errors",
    "requests",
    "max_lag_ms",
)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def p50_p99(values: list[float]) -> tuple[float, float]:
    """Median and 99th percentile (the statistics module's exclusive method)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    return statistics.median(values), statistics.quantiles(values, n=100)[98]


def summarize(
    results: Sequence[Result], lo: float, hi: float, names: dict[str, str]
) -> dict[str, Any]:
    """Figures of the requests that arrived in [lo, hi): latencies in ms, shares in 0..1."""
    measured = [r for r in results if lo <= r.at < hi]
    ok = [r for r in measured if r.ok]
    lat = [r.latency * 1000 for r in ok]
    ttft = [r.ttft * 1000 for r in ok if r.stream]
    errors = Counter(r.error for r in measured if not r.ok)
    samples = [f"{r.error}: {r.detail}" for r in measured if not r.ok][:ERROR_SAMPLES]
    by_node = Counter(names.get(r.node, r.node or "?") for r in ok)
    node_lat: dict[str, list[float]] = {name: [] for name in names.values()}
    for r in ok:
        node_lat.setdefault(names.get(r.node, r.node or "?"), []).append(r.latency * 1000)
    return {
        "requests": len(measured),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "error_samples": samples,
        "mean_ms": statistics.fmean(lat) if lat else math.nan,
        "p50_ms": quantile(lat, 0.5),
        "p90_ms": quantile(lat, 0.9),
        "p99_ms": quantile(lat, 0.99),
        "ttft_p50_ms": quantile(ttft, 0.5),
        "ttft_p99_ms": quantile(ttft, 0.99),
        "shares": {name: by_node.get(name, 0) / len(ok) if ok else 0.0 for name in names.values()},
        "node_mean_ms": {k: statistics.fmean(v) if v else math.nan for k, v in node_lat.items()},
        "max_lag_ms": max((r.lag * 1000 for r in measured), default=0.0),
    }


def summarize_window(results: Sequence[Result], lo: float, hi: float) -> dict[str, Any]:
    """Requests that arrived in [lo, hi): how many, how many failed, p50 and p99 in ms."""
    part = [r for r in results if lo <= r.at < hi]
    ok = [r.latency * 1000 for r in part if r.ok]
    return {
        "requests": len(part),
        "errors": sum(1 for r in part if not r.ok),
        "p50_ms": quantile(ok, 0.5),
        "p99_ms": quantile(ok, 0.99),
    }


def median_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median over runs of each :func:`summarize` figure; error kinds added up."""
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in NUMERIC}
    out["shares"] = {
        name: statistics.median(r["shares"][name] for r in runs) for name in runs[0]["shares"]
    }
    kinds: Counter[str] = Counter()
    for r in runs:
        kinds.update(r["error_kinds"])
    out["error_kinds_total"] = dict(kinds)
    out["error_samples"] = [s for r in runs for s in r["error_samples"]][:ERROR_SAMPLES]
    return out
