"""What the benchmarks print on stdout: the figures, the targets with their verdicts, the
errors and log lines worth a look, and one JSON line per run of a benchmark."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from typing import Any

from scripts.bench.load import Tally
from scripts.bench.paths import BASELINE, LABELS, TRACED
from scripts.bench.tables import comparison_rows, drill_lines, scale_rows, text_table
from scripts.bench.targets import GatewayTargets, StateTarget, verdict


def print_routing_report(result: dict[str, Any]) -> None:
    """The routing benchmark's report on stdout: scenario, tables, drills, targets, and the
    log lines worth a look."""
    sc = result["scenario"]
    nodes = ", ".join(f"{n['name']} {n['slots']}x{n['tokens_per_s']:g} tok/s" for n in sc["nodes"])
    print(
        f"fleetgate routing benchmark: {nodes}; outputs lognormal median "
        f"{sc['lengths']['median']:g} (mean {sc['lengths']['mean']:.1f}, cap "
        f"{sc['lengths']['cap']}) tokens, {sc['stream_fraction']:.0%} streamed; load "
        f"{sc['load']:.0%} of {sc['capacity_rps']:.1f} req/s = {sc['rate_rps']:.1f} req/s; "
        f"medians of {result['runs']} run(s) of {result['duration_s']:g} s"
    )
    if "comparison" in result:
        print()
        print(text_table(*comparison_rows(result)))
    if "scale" in result:
        print()
        print(
            f"cost by fleet size (1 replica, min_expected_latency, {result['scale']['rate_rps']:g}"
            " req/s, instant nodes)"
        )
        print(text_table(*scale_rows(result), left=1))
    if "drills" in result:
        print()
        for line in drill_lines(result):
            print(line)
    print()
    for name, t in result["targets"].items():
        print(f"{name}: {t['text']}: {verdict(t['holds'])}")
    found = {k: v for k, v in result.get("log_findings", {}).items() if v}
    for key, lines in found.items():
        print(f"{key}: {len(lines)} warning/error log line(s), first: {lines[0][:240]}")


def routing_summary_line(result: dict[str, Any]) -> dict[str, Any]:
    """The routing benchmark's figures in brief, for its one JSON line (no NaN)."""
    line: dict[str, Any] = {
        "bench": "routing",
        "runs": result["runs"],
        "duration_s": result["duration_s"],
        "load": result["scenario"]["load"],
        "rate_rps": result["scenario"]["rate_rps"],
    }
    if "comparison" in result:
        line["comparison"] = {
            key: {
                "mean_ms": round(row["median"]["mean_ms"], 1),
                "p99_ms": round(row["median"]["p99_ms"], 1),
                "ttft_p50_ms": round(row["median"]["ttft_p50_ms"], 1),
                "errors": row["median"]["errors"],
                "shares": {k: round(v, 3) for k, v in row["median"]["shares"].items()},
            }
            for key, row in result["comparison"].items()
        }
    if "scale" in result:
        line["scale"] = {
            size: {
                "gateway_cpu_ms_per_req": round(row["median"]["gateway_cpu_ms_per_req"], 3),
                "redis_cpu_us_per_req": round(row["median"]["redis_cpu_us_per_req"], 1),
            }
            for size, row in result["scale"]["sizes"].items()
        }
    if "drills" in result:
        d = result["drills"]
        line["drills"] = {
            key: {
                k: d[key].get(k)
                for k in (
                    "failed",
                    "failed_cut_at_kill",
                    "no_replica_routes_after_s",
                    "unhealthy_after_s",
                    "leases_expired_after_s",
                    "unfinished_zero_after_last_response_s",
                )
                if k in d[key]
            }
            for key in d
        }
    line["targets"] = {k: t["holds"] for k, t in result["targets"].items()}
    line["all_targets_hold"] = all(line["targets"].values())
    line["elapsed_s"] = round(result["elapsed_s"], 1)
    cleaned: dict[str, Any] = clean(line)
    return cleaned


def clean(obj: Any) -> Any:
    """JSON without NaN: NaN becomes null, floats are rounded to 4 decimals."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, 4)
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


def print_gateway_report(
    args: argparse.Namespace, result: dict[str, Any], findings: dict[str, list[str]]
) -> None:
    """The gateway benchmark's table, targets, errors and log findings, then its JSON line."""
    m: dict[str, float] = result["medians"]
    errors: dict[str, Tally] = result["errors"]
    c = args.concurrency
    print(
        f"fleetgate gateway benchmark: one worker, store {args.store}, strategy {args.strategy}; "
        f"medians of {args.runs} run(s); {args.duration:g} s per load measurement"
    )
    head = f"{'path':<16} {f'req/s (c={c})':>14} {f'SSE events/s (c={c})':>21}"
    print(f"{head} {'p50 ms (c=1)':>13} {'p99 ms (c=1)':>13}")
    paths = [name for name in LABELS if f"{name}.rps" in m]
    for name in paths:
        sse = f"{m[name + '.sse']:,.0f}" if f"{name}.sse" in m else "-"
        print(
            f"{LABELS[name]:<16} {m[name + '.rps']:>14,.0f} {sse:>21} "
            f"{m[name + '.p50']:>13.3f} {m[name + '.p99']:>13.3f}"
        )
    ratios = GatewayTargets.of(m)
    rps_ratio, sse_ratio = ratios.rps_vs_trivial, ratios.sse_vs_direct
    added_p50, added_p99 = ratios.added_p50_ms, ratios.added_p99_ms
    targets = ratios.holds()
    print()
    print(
        f"gateway req/s vs trivial ceiling: {rps_ratio:.1%} (target >= 50%): "
        f"{verdict(targets['rps_vs_trivial_ge_50pct'])}"
    )
    print(
        f"gateway SSE events/s vs direct:   {sse_ratio:.1%} (target >= 25%): "
        f"{verdict(targets['sse_vs_direct_ge_25pct'])}"
    )
    print(
        f"added p50 latency at c=1:         {added_p50:.3f} ms (target <= 1 ms): "
        f"{verdict(targets['added_p50_le_1ms'])}  (added p99 {added_p99:.3f} ms)"
    )
    tracing = tracing_cost(result["runs"]) if TRACED in paths else None
    if tracing is not None:
        exports = result.get("exports", {})
        print(
            f"tracing on ({args.trace_ratio:.0%} of traces sampled) vs off (same run, median "
            f"of {args.runs}): p50 at c=1 "
            f"{tracing['added_p50_ms']:+.3f} ms (p99 {tracing['added_p99_ms']:+.3f} ms), "
            f"req/s {tracing['rps_vs_off']:.1%}, SSE events/s {tracing['sse_vs_off']:.1%} of off; "
            f"CPU per request {tracing['cpu_us_on']:.0f} us against {tracing['cpu_us_off']:.0f} "
            f"us ({tracing['cpu_vs_off']:.2f}x); "
            f"{exports.get('exports', 0):,} OTLP exports ({exports.get('bytes', 0):,} bytes) "
            "received"
        )
    against_base = path_cost(result["runs"], "gateway", BASELINE) if BASELINE in paths else None
    if against_base is not None:
        base_name = args.baseline
        if args.baseline_strategy != args.strategy:
            base_name += f" with {args.baseline_strategy}"
        print(
            f"this tree vs {base_name} (same run, median of {args.runs}): p50 at c=1 "
            f"{against_base['added_p50_ms']:+.3f} ms (p99 {against_base['added_p99_ms']:+.3f} "
            f"ms), req/s {against_base['rps_vs_off']:.1%}, SSE events/s "
            f"{against_base['sse_vs_off']:.1%} of the baseline's; CPU per request "
            f"{against_base['cpu_us_on']:.0f} us against {against_base['cpu_us_off']:.0f} us "
            f"({against_base['cpu_vs_off']:.2f}x)"
        )
    n_errors = {name: sum(t.errors.values()) for name, t in errors.items()}
    for name, tally in errors.items():
        if tally.errors:
            kinds = ", ".join(f"{k} x{v}" for k, v in tally.errors.most_common())
            print(f"ERRORS on {name}: {kinds}")
            for sample in tally.samples:
                print(f"  {sample}")
    for name, lines in findings.items():
        if lines:
            print(f"{name} logged {len(lines)} warning/error line(s), first ones:")
            for text in lines[:5]:
                print(f"  {text[:300]}")
    figures = {
        name: {
            key.split(".", 1)[1]: round(value, 3 if key.endswith(("p50", "p99")) else 1)
            for key, value in m.items()
            if key.startswith(name + ".")
        }
        for name in paths
    }
    line: dict[str, Any] = {
        "bench": "gateway",
        "store": args.store,
        "strategy": args.strategy,
        "runs": args.runs,
        "duration_s": args.duration,
        "concurrency": c,
        "latency_requests": args.latency_requests,
        **figures,
        "rps_vs_trivial": round(rps_ratio, 4),
        "sse_vs_direct": round(sse_ratio, 4),
        "added_p50_ms": round(added_p50, 3),
        "added_p99_ms": round(added_p99, 3),
        "targets": targets,
        "all_targets_hold": all(targets.values()),
        "errors": n_errors,
        "log_findings": {name: len(lines) for name, lines in findings.items()},
    }
    if tracing is not None:
        line["tracing"] = {"sampled": args.trace_ratio, **tracing, **result.get("exports", {})}
    if against_base is not None:
        line["against_baseline"] = {
            "revision": args.baseline,
            "strategy": args.baseline_strategy,
            **against_base,
        }
    print(json.dumps(line))


def tracing_cost(runs: list[dict[str, float]]) -> dict[str, float]:
    """What tracing costs the gateway: the traced gateway against the untraced one."""
    return path_cost(runs, TRACED, "gateway")


def path_cost(runs: list[dict[str, float]], path: str, base: str) -> dict[str, float]:
    """What gateway ``path`` costs against gateway ``base``, each figure the median over runs
    of the two measured in the same run: latency added at concurrency 1 (ms) and the share of
    requests/s and SSE events/s kept; each process's CPU time per request under the req/s
    load (``off``: base's, ``on``: path's), and their ratio."""

    def median(of: Callable[[dict[str, float]], float]) -> float:
        return statistics.median(of(r) for r in runs)

    def ratio(figure: str) -> float:
        return round(median(lambda r: r[f"{path}.{figure}"] / r[f"{base}.{figure}"]), 4)

    return {
        "added_p50_ms": round(median(lambda r: r[f"{path}.p50"] - r[f"{base}.p50"]), 3),
        "added_p99_ms": round(median(lambda r: r[f"{path}.p99"] - r[f"{base}.p99"]), 3),
        "rps_vs_off": ratio("rps"),
        "sse_vs_off": ratio("sse"),
        "cpu_us_off": round(median(lambda r: r[f"{base}.cpu_us"]), 1),
        "cpu_us_on": round(median(lambda r: r[f"{path}.cpu_us"]), 1),
        "cpu_vs_off": ratio("cpu_us"),
    }


def print_state_report(
    strategy: str, runs: int, concurrency: int, results: dict[int, dict[str, float]]
) -> bool:
    """The state benchmark's table by fleet size, its target, then its JSON line; whether the
    target holds."""
    print(f"pick+release, strategy {strategy}, medians of {runs} runs")
    print(
        f"{'nodes':>6} {'pairs/s (c=' + str(concurrency) + ')':>18} "
        f"{'client us/call (c=1)':>21} {'server us/call':>15}"
    )
    for nodes, r in results.items():
        print(
            f"{nodes:>6} {r['pairs_per_s']:>18,.0f} {r['client_us_per_call']:>21.1f} "
            f"{r['server_us_per_call']:>15.1f}"
        )
    target = StateTarget.of(results)
    print(
        f"cost at 256 nodes / cost at 16: client {target.client_ratio:.2f}x, server "
        f"{target.server_ratio:.2f}x (target <= 2x: {verdict(target.holds)})"
    )
    print(
        json.dumps(
            {
                "bench": "state",
                "strategy": strategy,
                "runs": runs,
                "concurrency": concurrency,
                "results": {
                    str(k): {m: round(v, 2) for m, v in r.items()} for k, r in results.items()
                },
                "ratio_256_vs_16": {
                    "client": round(target.client_ratio, 3),
                    "server": round(target.server_ratio, 3),
                },
                "target_holds": target.holds,
            }
        )
    )
    return target.holds
