"""The admission benchmark's figures as text (scripts/bench_admission.py): its tables (printed
and in admission.md), the scenario in a paragraph, the targets, and the one JSON line of a
run."""

from __future__ import annotations

import math
from typing import Any

from scripts.bench.report import clean
from scripts.bench.tables import text_table

LINE_FIGURES = (
    "sent",
    "answered",
    "refused_429",
    "refused_503",
    "lost_total",
    "throughput_a",
    "throughput_b",
    "throughput_ratio",
    "high_ttft_p50_ms",
    "high_ttft_p90_ms",
    "queue_wait_p50_ms",
    "queue_wait_p90_ms",
    "queue_wait_p99_ms",
    "peak_max_any_run",
    "open_gap_p50_ms",
    "open_gap_p99_ms",
    "gap_p99_ms",
)
LOADED = {  # figures of the client loops' load
    "throughput_a",
    "throughput_b",
    "throughput_ratio",
    "queue_wait_p50_ms",
    "queue_wait_p90_ms",
    "queue_wait_p99_ms",
    "open_gap_p50_ms",
    "open_gap_p99_ms",
    "gap_p99_ms",
}


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0%}"


def phases(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The idle fleet, then every set-up, by key."""
    out = {"idle": result["idle"]} if result.get("idle") else {}
    return {**out, **result.get("setups", {})}


def request_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """What became of the requests, and the keys' throughput, by phase."""
    head = ["set-up", "sent", "answered", "refused 429", "refused 503", "lost (all runs)"]
    head += ["key a answers/s", "key b answers/s", "a/b", "a queued", "b queued", "queue depth"]
    rows = []
    for row in phases(result).values():
        m = row["median"]
        loaded = row.get("loops", True)  # the idle fleet has no client loops: no throughput
        rows.append(
            [
                row["label"],
                _n(m["sent"]),
                _n(m["answered"]),
                _n(m["refused_429"]),
                _n(m["refused_503"]),
                _n(m["lost_total"]),
                *(_n(m[k] if loaded else math.nan, 2) for k in ("throughput_a", "throughput_b")),
                _n(
                    m["throughput_a"] / m["throughput_b"]
                    if loaded and m["throughput_b"]
                    else math.nan,
                    2,
                ),
                *(_pct(m[k]) for k in ("queued_share_a", "queued_share_b")),
                _n(m["depth_mean"], 1),
            ]
        )
    return head, rows


def latency_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """High-priority TTFT, queue waits, node peaks and idle gaps, by phase."""
    names = sorted({n for row in phases(result).values() for r in row["runs"] for n in r["peaks"]})
    head = ["set-up", "high TTFT p50", "high TTFT p90", "high queued p90", "queue wait p50"]
    head += ["queue wait p90", "queue wait p99", *(f"{n} peak" for n in names)]
    head += ["idle gap p50", "idle gap p99", "p99 all slots", "gaps"]
    rows = []
    for row in phases(result).values():
        m = row["median"]
        peaks = [max((r["peaks"].get(n, 0) for r in row["runs"]), default=0) for n in names]
        # Idle gaps count while requests wait: on the idle fleet nothing does.
        gaps = ("open_gap_p50_ms", "open_gap_p99_ms", "gap_p99_ms", "open_gap_count")
        g = {k: m[k] if row.get("loops", True) else math.nan for k in gaps}
        rows.append(
            [
                row["label"],
                *(_n(m[k]) for k in ("high_ttft_p50_ms", "high_ttft_p90_ms")),
                *(
                    _n(m[k])
                    for k in (
                        "high_queue_wait_p90_ms",
                        "queue_wait_p50_ms",
                        "queue_wait_p90_ms",
                        "queue_wait_p99_ms",
                    )
                ),
                *(str(p) for p in peaks),
                _n(g["open_gap_p50_ms"], 1),
                _n(g["open_gap_p99_ms"], 1),
                _n(g["gap_p99_ms"], 1),
                _n(g["open_gap_count"]),
            ]
        )
    return head, rows


def target_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Target, the judged set-up's figure, bound, verdict, and the other set-ups' figures."""
    others = [k for k in result.get("setups", {}) if k != "admission"]
    labels = [result["setups"][k]["label"] for k in others]
    head = ["target", "with admission", "bound", "verdict", *(f"{x} (not judged)" for x in labels)]
    rows = [
        [
            name,
            t["text"],
            t["bound"],
            "pass" if t["holds"] else "FAIL",
            *(t["others"].get(k, "-") for k in others),
        ]
        for name, t in result.get("targets", {}).items()
    ]
    return head, rows


def describe(result: dict[str, Any]) -> str:
    """One paragraph: the nodes, the replicas, the clients, the high stream, the runs."""
    s = result["scenario"]
    a, b = s["loops"]["a"], s["loops"]["b"]
    cap = s["max_inflight"]
    return (
        f"{s['nodes']} simulated nodes (`gateway.sim.node`) of {cap} slots each, registered "
        f"with `--max-inflight {cap}`, decoding {s['tokens_per_s']:g} tokens/s per sequence; "
        f"answers of {s['min_tokens']}-{s['max_tokens']} tokens (uniform): the fleet's "
        f"capacity is {s['slots']} requests at once, {s['capacity_rps']:.1f} answers/s. "
        f"{s['replicas']} gateway replicas share one Redis; each client loop sends to one of "
        f"them, alternately. Two client keys of share 1: key a runs {a} closed loops and key "
        f"b {b} (a sends {a / b:g}x b), non-streamed, for {s['duration_s']:g} s: {a + b} "
        f"requests outstanding at all times, {s['offered']:.1f}x the fleet's slots. A third "
        "key sends `x-fleetgate-priority: high` requests, streamed, open-loop Poisson at "
        f"{s['high_rate_rps']:.2f}/s ({s['high_fraction']:.0%} of the capacity); the idle "
        f"fleet runs that stream alone. Judged set-up: `--priority-reserve {s['reserve']:g}` "
        f"(normal priority fills {s['normal_slots']} of a node's {cap} slots). Backlogged "
        f"window: {s['warmup_s']:g} s to {s['duration_s']:g} s; client timeout "
        f"{s['client_timeout_s']:g} s; medians of {result['runs']} run(s)."
    )


def busy(result: dict[str, Any]) -> str:
    """The machine's 1-minute load average after the phases, as a range."""
    loads = [
        r["loadavg_1m"]
        for row in phases(result).values()
        for r in row["runs"]
        if isinstance(r.get("loadavg_1m"), float)
    ]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "-"


def print_admission_report(result: dict[str, Any]) -> None:
    """The tables and targets on stdout."""
    print(f"fleetgate fleet-wide admission: {describe(result)}")
    print(f"Load average after the phases: {busy(result)}.")
    print()
    print(text_table(*request_rows(result), left=1))
    print()
    print(text_table(*latency_rows(result), left=1))
    for key, row in phases(result).items():
        m = row["median"]
        if m["lost_kinds_total"]:
            print(f"  {key}: lost {m['lost_kinds_total']}; e.g. {m['lost_samples'][:2]}")
        if row["log_findings_count"]:
            first = row["log_findings"][0][:240]
            print(f"  {key}: {row['log_findings_count']} warning/error log line(s): {first}")
    if result.get("targets"):
        print()
        print(text_table(*target_rows(result), left=1))


def admission_summary_line(result: dict[str, Any]) -> dict[str, Any]:
    """The figures in brief, for the one JSON line (no NaN): medians of the runs, the lost
    requests of all runs; null where a phase has no figure (the idle fleet: no client loops)."""
    line = {
        "bench": "admission",
        "runs": result["runs"],
        "duration_s": result["scenario"]["duration_s"],
        "setups": {
            key: {
                k: row["median"][k] if row.get("loops", True) or k not in LOADED else math.nan
                for k in LINE_FIGURES
            }
            for key, row in phases(result).items()
        },
        "targets": {
            name: {"figure": t["figure"], "bound": t["bound"], "holds": t["holds"]}
            for name, t in result.get("targets", {}).items()
        },
        "elapsed_s": result.get("elapsed_s"),
    }
    cleaned: dict[str, Any] = clean(line)
    return cleaned
