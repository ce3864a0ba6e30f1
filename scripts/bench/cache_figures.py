"""The cache benchmark's figures (scripts/bench_cache.py): one run's hit rates, time to first
token, latency and throughput from what became of its turns; the median of several runs; and
two set-ups compared run by run on the same arrivals.

Invariants:

- Hit rates are token-weighted (scripts/bench/hits.py): cached prompt tokens over prompt
  tokens, from the answers' ``usage.prompt_tokens_details.cached_tokens`` and from the nodes'
  own counters; NaN when nothing was asked, never 0.
- The measured window is the turns scheduled from ``lo`` on (the first turns, which meet cold
  caches, are sent but not counted); the nodes' counters cover the whole run, and so does the
  usage they are checked against.
- TTFT is to a stream's first content chunk; latency from the send to the last byte (a turn
  held for its predecessor's answer is not charged for that wait).
- Throughput is the measured turns answered (and their answers' tokens) over the time from
  the first of them sent to the last of them answered.
- Two set-ups are compared on the runs of the same seed: the figure is the median of the
  per-run ratios.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from scripts.bench.chat_load import ChatResult
from scripts.bench.figures import quantile
from scripts.bench.hits import PromptTokens, total

ERROR_SAMPLES = 4
NUMERIC = (
    "hit_rate",
    "node_hit_rate",
    "ttft_mean_ms",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "turns_per_s",
    "tokens_per_s",
    "errors",
    "requests",
    "held",
    "index_hit_rate",
    "store_errors",
)
CLASS_FIGURES = ("p99_ms", "ttft_p99_ms", "mean_ms", "turns")
# The gateways' own counters worth a run's record: what the prefix index predicted and corrected,
# store calls that failed (a pick that failed routed blind), retries.
GATEWAY_COUNTERS = {
    "fleetgate_store_errors_total": "store_errors",
    "fleetgate_retries_total": "retries",
}
_KIND = re.compile(r'kind="(\w+)"')


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def latency_figures(results: Sequence[ChatResult]) -> dict[str, float]:
    """Mean and quantiles of latency and TTFT, ms, of the answered ``results``."""
    ok = [r for r in results if r.ok]
    lat = [r.latency * 1000 for r in ok]
    ttft = [r.ttft * 1000 for r in ok if r.turn.stream and not math.isnan(r.ttft)]
    return {
        "mean_ms": _mean(lat),
        "p50_ms": quantile(lat, 0.5),
        "p90_ms": quantile(lat, 0.9),
        "p99_ms": quantile(lat, 0.99),
        "ttft_mean_ms": _mean(ttft),
        "ttft_p50_ms": quantile(ttft, 0.5),
        "ttft_p90_ms": quantile(ttft, 0.9),
        "ttft_p99_ms": quantile(ttft, 0.99),
    }


def throughput(results: Sequence[ChatResult]) -> tuple[float, float]:
    """Turns/s and answer tokens/s of the answered ``results``, from the first sent to the last
    answered; NaN for fewer than two."""
    ok = [r for r in results if r.ok]
    if len(ok) < 2:
        return math.nan, math.nan
    span = max(r.sent + r.latency for r in ok) - min(r.sent for r in ok)
    if span <= 0:
        return math.nan, math.nan
    return len(ok) / span, sum(r.completion_tokens for r in ok) / span


def summarize_cache_run(
    results: Sequence[ChatResult],
    lo: float,
    names: Mapping[str, str],
    node_tokens: Mapping[str, PromptTokens] | None = None,
    slow: Iterable[str] = (),
    gateway: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Figures of one run: the turns scheduled from ``lo`` on, the usage of every answered turn,
    the nodes' counters over the run (``node_tokens``, by node name), the gateways' counters
    (``gateway``, :func:`gateway_counters`: the index's own hit rate, in blocks, and the store
    calls that failed) and, with ``slow`` node names, the figures of the turns the slow and the
    other (fast) nodes answered."""
    measured = [r for r in results if r.turn.at >= lo]
    ok = [r for r in measured if r.ok]
    errors = Counter(r.error for r in measured if not r.ok)
    by_node = Counter(names.get(r.node, r.node or "?") for r in ok)
    usage = total(r.tokens for r in ok)
    whole = total(r.tokens for r in results if r.ok)
    counted = total((node_tokens or {}).values())
    turns_per_s, tokens_per_s = throughput(ok)
    out: dict[str, Any] = {
        "requests": len(measured),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "error_samples": [f"{r.error}: {r.detail}" for r in measured if not r.ok][:ERROR_SAMPLES],
        **latency_figures(ok),
        "hit_rate": usage.hit_rate,
        "prompt_tokens": usage.prompt,
        "cached_tokens": usage.cached,
        "node_hit_rate": counted.hit_rate if node_tokens else math.nan,
        "node_prompt_tokens": counted.prompt,
        "node_cached_tokens": counted.cached,
        "usage_prompt_tokens_whole_run": whole.prompt,
        "usage_cached_tokens_whole_run": whole.cached,
        "turns_per_s": turns_per_s,
        "tokens_per_s": tokens_per_s,
        "held": sum(1 for r in measured if r.held_s > 0.05),
        "shares": {n: by_node.get(n, 0) / len(ok) if ok else 0.0 for n in names.values()},
        "node_hit_rates": {
            n: total(r.tokens for r in ok if names.get(r.node) == n).hit_rate
            for n in names.values()
        },
        "gateway": dict(gateway or {}),
        "index_hit_rate": math.nan,
        "store_errors": gateway.get("store_errors", math.nan) if gateway else math.nan,
    }
    if gateway and gateway.get("prefix_total"):
        out["index_hit_rate"] = gateway["prefix_matched"] / gateway["prefix_total"]
    slow = set(slow)
    if slow:
        classes: dict[str, dict[str, float]] = {}
        for label, members in (("slow", slow), ("fast", set(names.values()) - slow)):
            part = [r for r in ok if names.get(r.node) in members]
            figures = latency_figures(part)
            classes[label] = {k: figures[k] for k in CLASS_FIGURES if k in figures}
            classes[label]["turns"] = len(part)
        out["classes"] = classes
    return out


def gateway_counters(pages: Iterable[str]) -> dict[str, float]:
    """The gateways' counters added up over their ``/metrics`` ``pages``: failed store calls,
    retries, and cache_aware's prompt blocks routed (``prefix_total``), found held by the chosen
    node (``prefix_matched``) and forgotten after an engine's count (``prefix_forgotten``)."""
    out = dict.fromkeys(
        [*GATEWAY_COUNTERS.values(), "prefix_total", "prefix_matched", "prefix_forgotten"], 0.0
    )
    for page in pages:
        for line in page.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            try:
                number = float(line.rpartition(" ")[2])
            except ValueError:
                continue
            if name == "fleetgate_prefix_blocks_total" and (kind := _KIND.search(line)):
                out[f"prefix_{kind.group(1)}"] = out.get(f"prefix_{kind.group(1)}", 0.0) + number
            elif name in GATEWAY_COUNTERS:
                out[GATEWAY_COUNTERS[name]] += number
    return out


def _median(values: Iterable[float]) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def median_cache_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median over runs of each figure of :func:`summarize_cache_run` (NaN runs left out),
    shares and node classes included; error kinds added up."""
    out: dict[str, Any] = {key: _median(r[key] for r in runs) for key in NUMERIC}
    out["shares"] = {n: _median(r["shares"][n] for r in runs) for n in runs[0]["shares"]}
    if "classes" in runs[0]:
        out["classes"] = {
            label: {k: _median(r["classes"][label][k] for r in runs) for k in CLASS_FIGURES}
            for label in runs[0]["classes"]
        }
    kinds: Counter[str] = Counter()
    for r in runs:
        kinds.update(r["error_kinds"])
    out["error_kinds_total"] = dict(kinds)
    out["error_samples"] = [s for r in runs for s in r["error_samples"]][:ERROR_SAMPLES]
    return out


def figure(run: Mapping[str, Any], path: str) -> float:
    """A run's figure by dotted ``path`` (``classes.slow.p99_ms``); NaN where it has none."""
    value: Any = run
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return math.nan
        value = value[part]
    return math.nan if value is None else float(value)


def paired_ratios(
    runs: Sequence[Mapping[str, Any]], base_runs: Sequence[Mapping[str, Any]], path: str
) -> list[float]:
    """``path`` of each run over that of the base run of the same seed (runs without one, or
    with a NaN or zero base, left out)."""
    base = {r["seed"]: r for r in base_runs}
    out = []
    for r in runs:
        if r["seed"] not in base:
            continue
        top, bottom = figure(r, path), figure(base[r["seed"]], path)
        if not math.isnan(top) and not math.isnan(bottom) and bottom:
            out.append(top / bottom)
    return out


def paired_ratio(
    runs: Sequence[Mapping[str, Any]], base_runs: Sequence[Mapping[str, Any]], path: str
) -> float:
    """The median of :func:`paired_ratios`; NaN when no run pairs."""
    return _median(paired_ratios(runs, base_runs, path))


def within_run_ratio(runs: Sequence[Mapping[str, Any]], top: str, bottom: str) -> float:
    """The median over runs of one figure over another of the same run (the slow nodes' p99
    over the fast nodes')."""
    ratios = []
    for r in runs:
        a, b = figure(r, top), figure(r, bottom)
        if not math.isnan(a) and not math.isnan(b) and b:
            ratios.append(a / b)
    return _median(ratios)
