"""The admission benchmark's targets (scripts/bench_admission.py), judged from its saved figures
for the set-up with fleet-wide admission; the same figures of every other set-up are shown
beside them, unjudged, so the difference shows.

Targets (each figure computed per run, then its median over runs, unless said otherwise):

1. no node ever runs more than its ``max_inflight``: the highest ``peak`` any node reported in
   any run (the nodes' own count of requests held at once);
2. high-priority requests' p90 TTFT within 1.5x of theirs on an idle fleet (the same stream
   alone, measured in the same run);
3. the two keys of equal share within 10% of each other in answers/s while both are
   backlogged (the larger over the smaller);
4. a freed slot that waiting requests may take stands idle less than 10 ms at p99 (the
   nodes' idle gaps in the backlogged window);
5. every request answered (200) or refused with 429/503 carrying Retry-After: none lost, in
   all runs together (a client timeout of ``client_timeout_s`` counts as lost).

A target whose figures are missing (a set-up that did not run) is left out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

JUDGED = "admission"
PEAK = "no node runs more than its max_inflight"
TTFT = "high priority: p90 TTFT vs the idle fleet"
FAIR = "keys of equal share: throughput while both are backlogged"
GAP = "freed slot idle while requests wait, p99"
LOST = "every request answered or refused with Retry-After"


def _median(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def _each(runs: list[float], unit: str) -> str:
    return "/".join(f"{r:.2f}{unit}" if unit == "x" else f"{r:.1f}" for r in runs) or "-"


def setup_figures(
    row: dict[str, Any], idle: dict[str, Any] | None, max_inflight: int
) -> dict[str, dict[str, Any]]:
    """Each target's figure, runs and text for the set-up ``row`` (its runs), the idle fleet's
    runs in ``idle`` as the TTFT baseline."""
    runs = row["runs"]
    out: dict[str, dict[str, Any]] = {}
    peaks = [float(r["peak_max"]) for r in runs]
    top = max(peaks, default=math.nan)
    out[PEAK] = {
        "figure": top,
        "runs": peaks,
        "text": f"{top:.0f} of {max_inflight} (highest node peak; runs {_each(peaks, '')})",
    }
    if idle is not None and idle["runs"]:
        ratios = [
            r["high_ttft_p90_ms"] / i["high_ttft_p90_ms"]
            for r, i in zip(runs, idle["runs"], strict=False)
            if i["high_ttft_p90_ms"] > 0
        ]
        ratio = _median(ratios)
        loaded = _median([r["high_ttft_p90_ms"] for r in runs])
        alone = _median([i["high_ttft_p90_ms"] for i in idle["runs"]])
        out[TTFT] = {
            "figure": ratio,
            "runs": ratios,
            "text": f"{ratio:.2f}x ({loaded:.0f} ms loaded, {alone:.0f} ms idle; runs "
            f"{_each(ratios, 'x')})",
        }
    fair = [r["throughput_ratio"] for r in runs]
    ratio = _median(fair)
    a = _median([r["throughput_a"] for r in runs])
    b = _median([r["throughput_b"] for r in runs])
    out[FAIR] = {
        "figure": ratio,
        "runs": fair,
        "text": f"{ratio:.2f}x (a {a:.2f}/s, b {b:.2f}/s; runs {_each(fair, 'x')})",
    }
    gaps = [r["open_gap_p99_ms"] for r in runs]
    p99 = _median(gaps)
    every = _median([r["gap_p99_ms"] for r in runs])
    out[GAP] = {
        "figure": p99,
        "runs": gaps,
        "text": f"{p99:.1f} ms (all slots, the reserved ones too: {every:.1f} ms; runs "
        f"{_each(gaps, '')})",
    }
    lost = sum(r["lost"] for r in runs)
    answered = sum(r["answered"] for r in runs)
    refused = sum(r["refused_429"] + r["refused_503"] for r in runs)
    sent = sum(r["sent"] for r in runs)
    out[LOST] = {
        "figure": lost,
        "runs": [r["lost"] for r in runs],
        "text": f"{lost:.0f} lost of {sent:.0f} ({answered:.0f} answered, {refused:.0f} refused)",
    }
    return out


BOUNDS: dict[str, tuple[str, Callable[[float, int], bool]]] = {
    PEAK: ("<= max_inflight", lambda v, cap: v <= cap),
    TTFT: ("<= 1.5x", lambda v, cap: v <= 1.5),
    FAIR: ("<= 1.10x", lambda v, cap: v <= 1.10),
    GAP: ("< 10 ms", lambda v, cap: v < 10.0),
    LOST: ("0 lost", lambda v, cap: v == 0),
}


def evaluate_admission(result: dict[str, Any]) -> dict[str, Any]:
    """Every target: its figure and runs for the judged set-up, the bound, whether it holds, a
    line of text, and the other set-ups' texts (``others``, by set-up key)."""
    rows = result.get("setups", {})
    if JUDGED not in rows or not rows[JUDGED]["runs"]:
        return {}
    cap = int(result["scenario"]["max_inflight"])
    idle = result.get("idle")
    figures = {key: setup_figures(row, idle, cap) for key, row in rows.items() if row["runs"]}
    targets: dict[str, Any] = {}
    for name, (bound, holds) in BOUNDS.items():
        if name not in figures[JUDGED]:
            continue
        judged = figures[JUDGED][name]
        figure = judged["figure"]
        targets[name] = {
            "figure": figure,
            "runs": judged["runs"],
            "bound": bound.replace("max_inflight", str(cap)),
            "holds": not math.isnan(figure) and holds(figure, cap),
            "text": judged["text"],
            "others": {
                key: f[name]["text"] for key, f in figures.items() if key != JUDGED and name in f
            },
        }
    return targets
