"""The cache benchmark's targets (scripts/bench_cache.py), judged from its saved figures: each
a ratio of two set-ups run by run on the same arrivals (or of two node classes in the same
run), its median over runs, the bound and whether it holds.

Targets:

- chats: ``cache_aware`` on 4 replicas sharing Redis within 5% of 1 replica, on hit rate (at
  least 0.95x) and on mean TTFT (at most 1.05x); its mean TTFT at least 2x better than 4
  replicas on private stores and than ``min_expected_latency`` on 4 sharing replicas.
- unequal nodes: under ``cache_aware`` on 4 sharing replicas, the slow nodes' p99 latency and
  p99 TTFT within 2x of the fast nodes'.
- real engines: the chats' result holds there: ``cache_aware`` on sharing replicas within 5%
  of 1 replica on hit rate and mean TTFT, and its mean TTFT at least 2x better than
  ``min_expected_latency``'s and ``round_robin``'s on the same sharing replicas, and than
  ``cache_aware``'s on as many replicas with private stores.

A target whose set-ups did not run is left out, never judged on half its figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from scripts.bench.cache_figures import paired_ratio, paired_ratios, within_run_ratio

CA = "cache_aware"
MEL = "min_expected_latency"


def _target(
    ratio: float, runs: list[float], bound: str, holds: Callable[[float], bool], what: str
) -> dict[str, Any]:
    each = "/".join(f"{r:.2f}" for r in runs)
    return {
        "figure": ratio,
        "runs": runs,
        "bound": bound,
        "holds": not math.isnan(ratio) and holds(ratio),
        "text": f"{ratio:.2f}x ({what}; runs {each or '-'}; target {bound})",
    }


def _rows(result: dict[str, Any], scenario: str) -> dict[str, Any]:
    rows: dict[str, Any] = result.get("scenarios", {}).get(scenario, {}).get("comparison", {})
    return rows


def _paired(
    targets: dict[str, Any],
    rows: dict[str, Any],
    name: str,
    top: str,
    bottom: str,
    path: str,
    bound: str,
    holds: Callable[[float], bool],
    what: str,
) -> None:
    if top not in rows or bottom not in rows:
        return
    runs = paired_ratios(rows[top]["runs"], rows[bottom]["runs"], path)
    ratio = paired_ratio(rows[top]["runs"], rows[bottom]["runs"], path)
    targets[name] = _target(ratio, runs, bound, holds, what)


def _as_one(targets: dict[str, Any], rows: dict[str, Any], name: str, shared: str) -> None:
    """``shared`` (``cache_aware`` on replicas sharing Redis) within 5% of 1 replica on hit rate
    and on mean TTFT."""
    for label, path, bound, holds in (
        ("hit rate", "hit_rate", ">= 0.95x", lambda r: r >= 0.95),
        ("mean TTFT", "ttft_mean_ms", "<= 1.05x", lambda r: r <= 1.05),
    ):
        _paired(
            targets,
            rows,
            f"{name}: {label}",
            shared,
            f"{CA}/1-replica",
            path,
            bound,
            holds,
            "shared / 1 replica",
        )


def evaluate_cache(result: dict[str, Any]) -> dict[str, Any]:
    """Every target whose set-ups ran: by name, its figure, each run's, the bound, whether it
    holds and a line of text."""
    targets: dict[str, Any] = {}
    chats = _rows(result, "chats")
    shared = next((k for k in chats if k.startswith(f"{CA}/") and "shared" in k), None)
    if shared:
        _as_one(targets, chats, "chats: cache_aware, 4 sharing vs 1 replica", shared)
        for other, label, what in (
            (f"{CA}/4-private", "cache_aware, 4 private stores", "private / shared"),
            (f"{MEL}/4-shared", "min_expected_latency, 4 sharing", f"{MEL} / cache_aware"),
        ):
            _paired(
                targets,
                chats,
                f"chats: mean TTFT, {label} vs cache_aware 4 sharing",
                other,
                shared,
                "ttft_mean_ms",
                ">= 2x",
                lambda r: r >= 2.0,
                what,
            )
    unequal = _rows(result, "unequal")
    key = f"{CA}/4-shared"
    if key in unequal:
        runs = unequal[key]["runs"]
        for path, label in (("p99_ms", "p99 latency"), ("ttft_p99_ms", "p99 TTFT")):
            top, bottom = f"classes.slow.{path}", f"classes.fast.{path}"
            each = [
                r["classes"]["slow"][path] / r["classes"]["fast"][path]
                for r in runs
                if "classes" in r and r["classes"]["fast"].get(path)
            ]
            targets[f"unequal nodes: cache_aware, slow vs fast nodes: {label}"] = _target(
                within_run_ratio(runs, top, bottom),
                [x for x in each if x is not None and not math.isnan(x)],
                "<= 2x",
                lambda r: r <= 2.0,
                "slow / fast",
            )
    engines = _rows(result, "engines")
    ca = next((k for k in engines if k.startswith(f"{CA}/") and "shared" in k), None)
    if ca:
        replicas = ca.split("/")[1]
        _as_one(targets, engines, f"real engines: cache_aware, {replicas} vs 1 replica", ca)
        private = replicas.replace("-shared", "-private")
        for name, other, what in (
            (f"{MEL} vs {CA} ({replicas})", f"{MEL}/{replicas}", f"{MEL} / {CA}"),
            (f"round_robin vs {CA} ({replicas})", f"round_robin/{replicas}", f"round_robin / {CA}"),
            (f"{CA}, {private} vs {replicas}", f"{CA}/{private}", "private / shared"),
        ):
            _paired(
                targets,
                engines,
                f"real engines: mean TTFT, {name}",
                other,
                ca,
                "ttft_mean_ms",
                ">= 2x",
                lambda r: r >= 2.0,
                what,
            )
    return targets
