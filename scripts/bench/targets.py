"""The benchmarks' targets: each measured figure set against its goal, with the verdict
("holds" or "MISSED") the reports print."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scripts.bench.scenario import LATENCY_STRATEGIES


def verdict(ok: bool) -> str:
    """The word a report prints for a target that holds, or not."""
    return "holds" if ok else "MISSED"


def evaluate(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its measured figure and whether it holds.

    Two set-ups are compared run by run: in a run both got the same arrivals, so the ratio of
    their mean latencies in that run is free of what the arrivals did to both (one seed's
    burst can move every set-up by 20%, more than the differences sought). The figure is the
    median of those per-run ratios.
    """
    targets: dict[str, dict[str, Any]] = {}
    comp = result.get("comparison", {})

    def paired(name: str, a: str, b: str, goal: str, holds: Callable[[float], bool]) -> None:
        """Target ``name``: the median over runs of a's mean over b's in the same run, minus 1."""
        if a not in comp or b not in comp:
            return
        by_seed = {r.get("seed"): r["mean_ms"] for r in comp[b]["runs"]}
        ratios = [
            r["mean_ms"] / by_seed[r.get("seed")] - 1
            for r in comp[a]["runs"]
            if by_seed.get(r.get("seed"))
        ]
        if not ratios:
            return
        ratio = statistics.median(ratios)
        runs = ", ".join(f"{x:+.1%}" for x in ratios)
        targets[name] = {
            "figure": ratio,
            "text": f"mean {ratio:+.1%} (runs {runs}; target {goal})",
            "holds": holds(ratio),
        }

    for s in LATENCY_STRATEGIES:
        shared = f"{s}/4-shared"
        paired(
            f"{s}: 4 shared vs 1 replica",
            shared,
            f"{s}/1-replica",
            "within +-5%",
            lambda r: abs(r) <= 0.05,
        )
        paired(
            f"{s}: 4 shared vs 4 private",
            shared,
            f"{s}/4-private",
            "<= -10%",
            lambda r: r <= -0.10,
        )
    for other in ("random", "round_robin"):
        paired(
            f"min_expected_latency vs {other} (4 shared)",
            "min_expected_latency/4-shared",
            f"{other}/4-shared",
            "< 0",
            lambda r: r < 0,
        )
    sizes = result.get("scale", {}).get("sizes", {})
    if "64" in sizes and "256" in sizes:
        for key, label in (
            ("gateway_cpu_ms_per_req", "gateway CPU/request"),
            ("redis_cpu_us_per_req", "Redis CPU/request"),
        ):
            ratio = sizes["256"]["median"][key] / sizes["64"]["median"][key]
            targets[f"scale: {label} at 256 vs 64 nodes"] = {
                "figure": ratio,
                "text": f"{ratio:.2f}x (target <= 1.25x)",
                "holds": ratio <= 1.25,
            }
    return targets


@dataclass(frozen=True, slots=True)
class GatewayTargets:
    """The gateway benchmark's ratios, from the medians of its figures by ``path.figure``."""

    rps_vs_trivial: float
    sse_vs_direct: float
    added_p50_ms: float
    added_p99_ms: float

    @classmethod
    def of(cls, medians: dict[str, float]) -> GatewayTargets:
        """The ratios of the gateway path to the trivial ceiling and to the node direct."""
        return cls(
            rps_vs_trivial=medians["gateway.rps"] / medians["trivial.rps"],
            sse_vs_direct=medians["gateway.sse"] / medians["direct.sse"],
            added_p50_ms=medians["gateway.p50"] - medians["direct.p50"],
            added_p99_ms=medians["gateway.p99"] - medians["direct.p99"],
        )

    def holds(self) -> dict[str, bool]:
        """Each target by name: whether it holds."""
        return {
            "rps_vs_trivial_ge_50pct": self.rps_vs_trivial >= 0.5,
            "sse_vs_direct_ge_25pct": self.sse_vs_direct >= 0.25,
            "added_p50_le_1ms": self.added_p50_ms <= 1.0,
        }


@dataclass(frozen=True, slots=True)
class StateTarget:
    """The state benchmark's target: the cost of a script call at 256 nodes at most twice
    that at 16, seen by the client one at a time and by the server."""

    client_ratio: float
    server_ratio: float

    @classmethod
    def of(cls, results: dict[int, dict[str, float]]) -> StateTarget:
        """The ratios of the medians at 256 nodes to those at 16."""
        return cls(
            client_ratio=results[256]["client_us_per_call"] / results[16]["client_us_per_call"],
            server_ratio=results[256]["server_us_per_call"] / results[16]["server_us_per_call"],
        )

    @property
    def holds(self) -> bool:
        return max(self.client_ratio, self.server_ratio) <= 2.0
