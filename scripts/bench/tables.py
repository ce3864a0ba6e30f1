"""The routing benchmark's figures as tables and sentences, shared by the printed report and
results.md: the comparison, the cost by fleet size, and the drills."""

from __future__ import annotations

import math
from typing import Any


def _ms(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def comparison_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Head and rows of the comparison table: medians by set-up, shares, each run's mean."""
    comp = result["comparison"]
    names = [n["name"] for n in result["scenario"]["nodes"]]
    head = ["strategy", "set-up", "mean ms", "p50 ms", "p90 ms", "p99 ms", "TTFT p50", "TTFT p99"]
    head += ["errors", *names, "mean of each run"]
    rows = []
    for row in comp.values():
        m = row["median"]
        rows.append(
            [
                row["strategy"],
                row["mode"],
                *(_ms(m[k]) for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms")),
                *(_ms(m[k]) for k in ("ttft_p50_ms", "ttft_p99_ms")),
                f"{m['errors']:g}",
                *(f"{m['shares'][n]:.0%}" for n in names),
                "/".join(f"{r['mean_ms']:.0f}" for r in row["runs"]),
            ]
        )
    capacity = ["capacity share", "", *[""] * 7]
    capacity += [f"{n['capacity_share']:.0%}" for n in result["scenario"]["nodes"]]
    capacity += [""]
    rows.append(capacity)
    return head, rows


def scale_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Head and rows of the cost-by-fleet-size table."""
    head = ["nodes", "gateway CPU ms/req", "Redis CPU us/req", "scripts/req", "us/script call"]
    head += ["p50 ms"]
    rows = []
    for size, row in result["scale"]["sizes"].items():
        m = row["median"]
        rows.append(
            [
                size,
                f"{m['gateway_cpu_ms_per_req']:.3f}",
                f"{m['redis_cpu_us_per_req']:.1f}",
                f"{m['script_calls_per_req']:.2f}",
                f"{m['script_us_per_call']:.1f}",
                f"{m['p50_ms']:.2f}",
            ]
        )
    return head, rows


def text_table(head: list[str], rows: list[list[str]], left: int = 2) -> str:
    """A plain-text table, the first ``left`` columns aligned left and the rest right."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for r in [head, *rows]:
        cells = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def md_table(head: list[str], rows: list[list[str]], left: int = 2) -> str:
    """A Markdown table, the first ``left`` columns aligned left and the rest right."""
    align = [":--" if i < left else "--:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _s(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "never"
    return f"{value:.2f} s"


def drill_lines(result: dict[str, Any]) -> list[str]:
    """One sentence per failure drill: what failed, who still tried the dead node, and when."""
    d = result.get("drills", {})
    lines = []
    for key, title in (
        ("node_kill_shared", "4 replicas sharing Redis, health-checker every 0.5 s, fall 2"),
        ("node_kill_private", "4 replicas with private stores, no health-checker"),
    ):
        if key not in d:
            continue
        x = d[key]
        attempts = ", ".join(f"{a:g}" for a in x["attempts_after_kill_per_replica"])
        retried = (
            "none failed: each was retried on another node before the first byte"
            if x["failed_after_kill"] == 0
            else f"{x['failed_after_kill']} later arrivals failed"
        )
        if key == "node_kill_shared":
            ejected = x["ejected_seen_after_s"]
            detection = (
                "passive ejection (shared by all replicas through Redis) "
                + (
                    f"seen after {_s(ejected)}"
                    if ejected is not None
                    else "not seen (too few attempts on the node before the checker's verdict)"
                )
                + f"; marked unhealthy by the checker after {_s(x['unhealthy_after_s'])}"
            )
        else:
            detection = (
                f"no checker can reach private stores: {x['ejections']:g} passive ejections, "
                "each replica on its own after 5 consecutive failures, 5 s then doubling"
            )
        lines.append(
            f"kill -9 {x['victim']} at {x['kill_at_s']:.1f} s ({title}; load "
            f"{x['load']:.0%} of the full fleet): {x['failed']} of {x['requests']} requests "
            f"failed, {x['failed_cut_at_kill']} of them streams cut at the kill "
            f"({x['in_flight_on_victim_at_kill']} requests were on the node); attempts on the "
            f"dead node after the kill, per replica: {attempts} ({retried}; {x['retries']:g} "
            f"retries in all); last attempt {_s(x['no_replica_routes_after_s'])} after the "
            f"kill (watched for {x['duration_s'] - x['kill_at_s'] + 2:.0f} s); "
            f"{detection}; the rest carried on: after the kill p50 "
            f"{_ms(x['after_kill']['p50_ms'])} ms, p99 {_ms(x['after_kill']['p99_ms'])} ms "
            f"(before: {_ms(x['before_kill']['p50_ms'])} / {_ms(x['before_kill']['p99_ms'])}; "
            "the survivors carry the same load)"
        )
    if "replica_kill" in d:
        x = d["replica_kill"]
        lines.append(
            f"kill -9 replica gw-0 at {x['kill_at_s']:.1f} s (4 sharing Redis, --lease-seconds "
            f"{x['lease_s']:g}): {x['failed_through_killed_replica']} requests in flight "
            f"through it failed, {x['failed_after_kill_elsewhere']} failed elsewhere after the "
            f"kill; it held {x['leases_of_killed_replica_at_kill']} of "
            f"{x['leases_total_at_kill']} leases, all expired "
            f"{_s(x['leases_expired_after_s'])} after the kill; /nodes/replicas dropped it after "
            f"{_s(x['dropped_from_replicas_after_s'])}; /nodes/status unfinished back to 0 "
            f"{_s(x['unfinished_zero_after_last_response_s'])} after the last response "
            f"(nodes idle: {x['nodes_idle_after']})"
        )
    return lines
