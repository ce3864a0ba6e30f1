"""The engine scenario's figures as text: the comparison table (printed and in Markdown),
engines.md with how and where they were measured, and the one JSON line of a run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from scripts.bench.report import clean
from scripts.bench.tables import md_table, text_table

ENGINE_HEAD = (
    "engine",
    "threads",
    "slots",
    "prompt cache MiB",
    "cold first turn ms",
    "cached first turn ms",
    "registered speed",
    "cache blocks",
)


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0%}"


def _x(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


def engine_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Head and rows of the comparison: medians by set-up, hit rates, shares, and the ratios
    to the baseline in the same run."""
    names = [e["name"] for e in result["engines"]]
    base = result["baseline"]
    head = ["strategy", "set-up", "mean ms", "p50 ms", "p90 ms", "p99 ms", "TTFT p50"]
    head += ["TTFT p90", "hit rate", "engines' hit rate", "mostly uncached", "errors", *names]
    head += [f"mean / {base}", f"TTFT p50 / {base}", f"mean / {base}, each run"]
    rows = []
    for row in result["comparison"].values():
        m = row["median"]
        vs = row.get("vs_baseline", {})
        rows.append(
            [
                row["strategy"],
                row["mode"],
                *(_ms(m[k]) for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms")),
                *(_ms(m[k]) for k in ("ttft_p50_ms", "ttft_p90_ms")),
                _pct(m["hit_rate"]),
                _pct(m["engine_hit_rate"]),
                _pct(m["miss_share"]),
                f"{m['errors']:g}",
                *(_pct(m["shares"].get(n, 0.0)) for n in names),
                _x(vs.get("mean_ms")),
                _x(vs.get("ttft_p50_ms")),
                "/".join(f"{x:.2f}" for x in vs.get("mean_ms_runs", [])) or "-",
            ]
        )
    return head, rows


def describe_scenario(result: dict[str, Any]) -> str:
    """One paragraph: engines, workload, rate, runs."""
    w = result["workload"]
    cal = result["calibration"]
    engines = ", ".join(
        f"{e['name']} ({e['threads']} thread, {e['parallel']} slot, {e['cache_mib']} MiB prompt "
        f"cache)"
        for e in result["engines"]
    )
    return (
        f"llama.cpp llama-server x{len(result['engines'])}: {engines}, serving the random "
        f"{result['model']}; chats: {w['prompts']} system prompts of {w['prompt_words']} words, "
        f"{w['turns']} turns of {w['user_words']}-word questions and {w['answer_tokens']}-token "
        f"answers, {w['conversations']} open at once, {w['stream_fraction']:.0%} streamed; "
        f"offered {result['rate_rps']:.2f} turns/s = {result['load']:.0%} of the fleet's cold "
        f"capacity ({cal['cold_capacity_rps']:.2f}/s); medians of {result['runs']} run(s) of "
        f"{result['requests']} turns ({result['span_s']:.0f} s), the first "
        f"{result['warmup_requests']} not counted"
    )


def machine_load(result: dict[str, Any]) -> str:
    """The machine's 1-minute load average at the end of the set-up runs: median and max."""
    loads = sorted(
        r["loadavg_1m"]
        for row in result["comparison"].values()
        for r in row["runs"]
        if r.get("loadavg_1m") is not None
    )
    if not loads:
        return ""
    return (
        f"1-minute load average at the end of each set-up's run: median "
        f"{loads[len(loads) // 2]:.1f}, max {loads[-1]:.1f} on {result['machine']['cpus']} CPUs"
    )


def print_engine_report(result: dict[str, Any]) -> None:
    """The engine scenario's report on stdout."""
    print(f"fleetgate routing on real engines: {describe_scenario(result)}")
    for name, e in result["calibration"]["engines"].items():
        print(
            f"  {name}: first turn {e['prompt_tokens']} tokens, cold {e['miss_median_ms']:.0f} "
            f"ms, system prompt cached {e['hit_median_ms']:.0f} ms"
        )
    if machine_load(result):
        print(f"  {machine_load(result)}")
    print()
    print(text_table(*engine_rows(result)))
    for key, row in result["comparison"].items():
        kinds = row["median"].get("error_kinds_total", {})
        if kinds:
            print(f"{key}: errors {kinds}; e.g. {row['median']['error_samples'][:2]}")
        if row["log_findings_count"]:
            first = row["log_findings"][0][:240]
            print(f"{key}: {row['log_findings_count']} warning/error log line(s), first: {first}")


def engine_summary_line(result: dict[str, Any]) -> dict[str, Any]:
    """The engine scenario's figures in brief, for its one JSON line (no NaN)."""
    line = {
        "bench": "routing-engines",
        "runs": result["runs"],
        "requests": result["requests"],
        "load": result["load"],
        "rate_rps": result["rate_rps"],
        "cold_capacity_rps": result["calibration"]["cold_capacity_rps"],
        "comparison": {
            key: {
                "mean_ms": row["median"]["mean_ms"],
                "p90_ms": row["median"]["p90_ms"],
                "ttft_p50_ms": row["median"]["ttft_p50_ms"],
                "hit_rate": row["median"]["hit_rate"],
                "engine_hit_rate": row["median"]["engine_hit_rate"],
                "errors": row["median"]["errors"],
                "shares": row["median"]["shares"],
                "vs_baseline": {
                    k: v for k, v in row.get("vs_baseline", {}).items() if not k.endswith("_runs")
                },
            }
            for key, row in result["comparison"].items()
        },
        "elapsed_s": result["elapsed_s"],
    }
    cleaned: dict[str, Any] = clean(line)
    return cleaned


def write_engine_markdown(result: dict[str, Any], out: Path, charts: list[str]) -> None:
    """Write ``out``/engines.md: the scenario, the calibration, the table and the charts."""
    cal = result["calibration"]
    w = result["workload"]
    lines = [
        "# Routing on real engines",
        "",
        f"Measured on {result['date']} by `{result['command']}` "
        f"({result['elapsed_s'] / 60:.1f} minutes; {result['machine']['cpus']} CPUs, "
        f"{result['machine']['cpu_model']}, Python {result['machine']['python']}). Raw figures "
        "of every run: [engines.json](engines.json). Unlike the other figures here, which "
        "come from simulated nodes, these are llama.cpp's own `llama-server`s (built by "
        "`scripts/engines.py`) with their own prefix caches, tokenizer and counters. "
        "Regenerate with `python scripts/bench_routing.py --engines llama` "
        "(`--replot docs/benchmarks/engines.json` redraws the chart and this page).",
        "",
        "## Scenario",
        "",
        md_table(
            [*ENGINE_HEAD],
            [
                [
                    e["name"],
                    str(e["threads"]),
                    str(e["parallel"]),
                    str(e["cache_mib"]),
                    f"{cal['engines'][e['name']]['miss_median_ms']:,.0f}",
                    f"{cal['engines'][e['name']]['hit_median_ms']:,.0f}",
                    f"{cal['engines'][e['name']].get('speed', 0):,.0f}",
                    str(cal["engines"][e["name"]].get("cache_blocks", "-")),
                ]
                for e in result["engines"]
            ],
            left=1,
        ),
        "",
        f"Each engine serves the random `{result['model']}` ({result.get('model_shape', '?')}) "
        "with the CPU threads above; a first turn's prompt is about "
        f"{next(iter(cal['engines'].values()))['prompt_tokens']} tokens. Before the runs, "
        "every engine answered three first turns whose system prompt it did not hold (cold) "
        "and, after each, one on the same system prompt (cached), all engines at once; the "
        "fleet's cold capacity is the sum of one over the cold times: what it serves if no "
        "prefix were ever reused. Nodes are registered with a `speed`, their threads times the "
        "engines' median cold prompt tokens/s per thread (alike engines alike: a calibration's "
        "noise must not rank them), and, for `cache_aware`, the prompt text their KV memory "
        "holds as "
        f"`cache_blocks` (prompt-cache RAM over {result.get('kv_bytes_per_token', 0) / 1024:g} "
        "KiB of KV per token, plus a prompt per "
        f"slot, at {cal['bytes_per_token']:.1f} bytes of text per token, in 256-byte blocks).",
        "",
        f"Chats: {w['prompts']} system prompts of {w['prompt_words']} common English words "
        f"each; a conversation opens with one of them (uniformly), then {w['turns']} turns, each "
        f"a {w['user_words']}-word question sent with the whole history, answered with "
        f"{w['answer_tokens']} tokens (greedy); {w['conversations']} conversations open at once, "
        f"a conversation's turns at least {w['min_gap_s']:g} s apart and never before the "
        f"previous answer; {w['stream_fraction']:.0%} of turns streamed. Arrivals: open-loop "
        f"Poisson at {result['rate_rps']:.2f} turns/s ({result['load']:.0%} of the cold "
        f"capacity of {cal['cold_capacity_rps']:.2f}/s), each turn sent to a gateway replica "
        "drawn uniformly (an L4 balancer: a conversation's turns spread over the replicas), "
        "with the conversation's `X-Session-ID`. Every set-up starts on engines restarted "
        "empty, with a health-checker reading their `/metrics` and `/slots`. Latency: send to "
        "last byte; TTFT: to the first content chunk of a stream. Each figure is the median "
        f"of {result['runs']} runs of {result['requests']} turns over {result['span_s']:.0f} s "
        f"(the first {result['warmup_requests']}, the warm-up, sent but not counted); in a run "
        "every set-up gets the same turns. The machine is shared: its "
        f"{machine_load(result) or 'load was not recorded'} (the engines alone make about "
        "one per busy engine).",
        "",
        "## Strategies",
        "",
        "Hit rate: cached prompt tokens over prompt tokens, from the engines' "
        "`usage.prompt_tokens_details.cached_tokens` (measured window); engines' hit rate: "
        "from their `llamacpp:prompt_tokens_cached_total` and `llamacpp:prompt_tokens_total` "
        "(whole run, warm-up included). Mostly uncached: turns that found less than half their "
        f"prompt cached. Ratios to `{result['baseline']}`: the median over runs of the ratio in "
        "the same run. Engine columns: share of the answered turns.",
        "",
        md_table(*engine_rows(result)),
        "",
    ]
    if charts:
        lines += ["## Charts", "", *(f"![{c}]({c})" for c in charts), ""]
    (out / "engines.md").write_text("\n".join(lines))
