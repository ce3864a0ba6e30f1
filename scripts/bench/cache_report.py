"""The cache benchmark's figures as text (scripts/bench_cache.py): the tables of each scenario
(printed and in Markdown), the targets, cache.md with how and where they were measured, and
the one JSON line of a run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from scripts.bench.report import clean
from scripts.bench.tables import md_table, text_table

TITLES = {
    "chats": "Chats on simulated nodes alike",
    "unequal": "Chats on unequal simulated nodes",
    "engines": "Chats on real llama-server engines",
}


def ordered(scenarios: dict[str, Any]) -> dict[str, Any]:
    """The scenarios in the order of :data:`TITLES`, any other last."""
    rank = {name: i for i, name in enumerate(TITLES)}
    return dict(sorted(scenarios.items(), key=lambda item: rank.get(item[0], len(rank))))


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1%}"


def _rate(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def scenario_rows(scenario: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Head and rows of a scenario's comparison: medians of the runs by set-up."""
    names = [n["name"] for n in scenario.get("nodes") or scenario.get("engines") or []]
    head = ["strategy", "set-up", "hit rate", "nodes' hit rate", "TTFT mean", "TTFT p50"]
    head += ["TTFT p90", "latency mean", "latency p90", "latency p99", "turns/s", "tokens/s"]
    head += ["errors", "index's hit rate", "store errors", *names]
    classes = any("classes" in row["median"] for row in scenario["comparison"].values())
    if classes:
        head += ["slow p99", "fast p99", "slow TTFT p99", "fast TTFT p99"]
    rows = []
    for row in scenario["comparison"].values():
        m = row["median"]
        line = [
            row["strategy"],
            row["mode"],
            _pct(m["hit_rate"]),
            _pct(m["node_hit_rate"]),
            *(_ms(m[k]) for k in ("ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms")),
            *(_ms(m[k]) for k in ("mean_ms", "p90_ms", "p99_ms")),
            _rate(m["turns_per_s"]),
            f"{m['tokens_per_s']:.0f}" if not math.isnan(m["tokens_per_s"]) else "-",
            f"{m['errors']:g}",
            _pct(m.get("index_hit_rate")),
            "-" if math.isnan(m.get("store_errors", math.nan)) else f"{m['store_errors']:g}",
            *(f"{m['shares'].get(n, 0.0):.0%}" for n in names),
        ]
        if classes:
            c = m.get("classes", {})
            line += [
                _ms(c.get(label, {}).get(k))
                for k in ("p99_ms", "ttft_p99_ms")
                for label in ("slow", "fast")
            ]
        rows.append(line)
    return head, rows


def target_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Head and rows of the targets: name, measured, verdict."""
    rows = [
        [name, t["text"], "pass" if t["holds"] else "FAIL"]
        for name, t in result.get("targets", {}).items()
    ]
    return ["target", "measured", "verdict"], rows


def describe(result: dict[str, Any], name: str) -> str:
    """One sentence: the scenario's nodes, the rate and the runs."""
    s = result["scenarios"][name]
    if name == "engines":
        cal = s["calibration"]
        engines = ", ".join(
            f"{e['name']} ({e['threads']} thread, {e['parallel']} slot, {e['cache_mib']} MiB of "
            "prompt cache" + (", every prompt saved to it" if e.get("save_prompts") else "") + ")"
            for e in s["engines"]
        )
        return (
            f"Real engines: llama.cpp llama-servers serving the random {s['model']}, {engines}; "
            f"{s['replicas']} gateway replicas sharing Redis; the gateways count the engines' "
            f"caches in {s.get('cache_unit', 'blocks')} (`--prefix-cache-unit`, "
            f"{cal['engines'][s['engines'][0]['name']]['cache_blocks']} blocks each); "
            f"{s['turns']} turns at "
            f"{s['rate_rps']:.2f}/s ({s['load']:.0%} of the cold capacity, "
            f"{cal['cold_capacity_rps']:.2f}/s, measured); medians of {len(_runs(s))} run(s)"
        )
    kinds: dict[str, list[str]] = {}
    for n in s["nodes"]:
        kind = (
            f"{n['slots']} slots, decode {n['tokens_per_s']:g} tokens/s, prefill "
            f"{n['prefill_tokens_per_s']:,.0f} tokens/s, a cache of {n['cache_blocks']} blocks of "
            f"{n['block_tokens']} words = {s['gateway_cache_blocks'][n['name']]} gateway blocks"
        )
        kinds.setdefault(kind, []).append(n["name"])
    nodes = "; ".join(f"{', '.join(names)}: {kind}" for kind, names in kinds.items())
    return (
        f"Simulated nodes ({nodes}); {s['turns']} turns at {s['rate_rps']:.2f}/s "
        f"({s['load']:.0%} of the cold capacity, {s['cold_capacity_rps']:.2f}/s) over "
        f"{s['span_s']:.0f} s; medians of {len(_runs(s))} run(s)"
    )


def _runs(scenario: dict[str, Any]) -> list[Any]:
    rows: list[dict[str, Any]] = list(scenario["comparison"].values())
    return list(rows[0]["runs"]) if rows else []


def busy(scenario: dict[str, Any]) -> str:
    """The machine's 1-minute load average over a scenario's runs, as a range."""
    loads = [
        run["loadavg_1m"]
        for row in scenario["comparison"].values()
        for run in row["runs"]
        if isinstance(run.get("loadavg_1m"), float) and not math.isnan(run["loadavg_1m"])
    ]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "-"


def print_cache_report(result: dict[str, Any]) -> None:
    """The benchmark's tables and targets on stdout."""
    w = result["workload"]
    print(
        f"fleetgate cache-aware routing: {w['conversations']} chats of {w['min_turns']}-"
        f"{w['max_turns']} turns sharing {w['prompts']} system prompts of {w['prompt_words']} "
        f"words; {w['user_words']}-word questions, {w['answer_tokens']}-token answers"
    )
    for name, scenario in ordered(result["scenarios"]).items():
        print()
        print(f"{TITLES.get(name, name)}: {describe(result, name)}; load average {busy(scenario)}")
        print(text_table(*scenario_rows(scenario)))
        for key, row in scenario["comparison"].items():
            kinds = row["median"].get("error_kinds_total", {})
            if kinds:
                print(f"  {key}: errors {kinds}; e.g. {row['median']['error_samples'][:2]}")
            if row["log_findings_count"]:
                first = row["log_findings"][0][:240]
                print(f"  {key}: {row['log_findings_count']} warning/error log line(s): {first}")
            for run in row["runs"]:
                if "retried" in run:
                    print(f"  {key}: seed {run['seed']} run again after {run['retried']}")
    if result.get("targets"):
        print()
        print(text_table(*target_rows(result), left=1))


def cache_summary_line(result: dict[str, Any]) -> dict[str, Any]:
    """The figures in brief, for the one JSON line (no NaN)."""
    keep = ("hit_rate", "node_hit_rate", "ttft_mean_ms", "ttft_p90_ms", "mean_ms", "turns_per_s")
    line = {
        "bench": "cache",
        "scenarios": {
            name: {key: {k: row["median"][k] for k in keep} for key, row in s["comparison"].items()}
            for name, s in result["scenarios"].items()
        },
        "targets": {name: t["holds"] for name, t in result.get("targets", {}).items()},
        "elapsed_s": result.get("elapsed_s"),
    }
    cleaned: dict[str, Any] = clean(line)
    return cleaned


def write_cache_markdown(result: dict[str, Any], out: Path, charts: list[str]) -> None:
    """Write ``out``/cache.md: the scenarios, the tables, the targets and the charts."""
    w = result["workload"]
    lines = [
        "# Cache-aware routing benchmark",
        "",
        f"Measured on {result['date'][:10]} in {result['elapsed_s'] / 60:.0f} minutes "
        f"({result['machine']['cpus']} CPUs, {result['machine']['cpu_model']}, Python "
        f"{result['machine']['python']}; each section says when and by which command). Raw "
        "figures of every run: [cache.json](cache.json). Regenerate with "
        '`pip install -e ".[bench]"` and `python scripts/bench_cache.py` (`--parts` to '
        "measure some, `--update` to keep the others; `--replot docs/benchmarks/cache.json` "
        "redraws the charts and this page). "
        "Each section says whether its figures come from "
        "simulated nodes (`gateway.sim.node` with its prefix cache) or from real llama.cpp "
        "`llama-server`s, whose prefix caches, tokenizer and counters are their own.",
        "",
        "## Workload",
        "",
        f"{w['conversations']} conversations (SGLang's generated-shared-prefix and multi-turn "
        f"benchmarks, in small), each opening with one of {w['prompts']} system prompts of "
        f"{w['prompt_words']} common English words (uniformly), then {w['min_turns']} to "
        f"{w['max_turns']} turns (uniformly): a {w['user_words']}-word question sent with the "
        f"whole history, answered with {w['answer_tokens']} tokens; at most "
        f"{w['open_at_once']} open at once, a conversation's turns at least {w['min_gap_s']:g} "
        f"s apart and never before the previous answer; {w['stream_fraction']:.0%} streamed. "
        "Arrivals: open-loop Poisson (conditioned on the count: every turn of every "
        "conversation, over turns / rate seconds), each turn sent to a gateway replica drawn "
        "uniformly (an L4 balancer: a conversation's turns spread over the replicas), with "
        f"its conversation's `X-Session-ID`. The first {result['warmup_turns']} turns of a run "
        "are sent but not counted in latency, TTFT and the usage hit rate (caches start "
        "empty); the nodes' hit rate counts the whole run. Every set-up of a run gets the "
        "same turns and starts on emptied caches (`POST /reset_prefix_cache`), an emptied "
        "Redis and new gateways; the order of the set-ups rotates each run.",
        "",
        "Hit rate: cached prompt tokens over prompt tokens, from the answers' "
        "`usage.prompt_tokens_details.cached_tokens`; nodes' hit rate: from their "
        "`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total` (llama.cpp: "
        "`llamacpp:prompt_tokens_cached_total` over it plus `llamacpp:prompt_tokens_total`). "
        "Index's hit rate: the blocks of the routed prompts that the gateways' shared index "
        "said the chosen node held (`fleetgate_prefix_blocks_total`, matched over total; "
        "`cache_aware` only); store errors: the gateways' failed store calls "
        "(`fleetgate_store_errors_total`: a pick that failed was routed blind, by the "
        "replica's local fallback). "
        "TTFT: send to the first content chunk of a stream; latency: send to last byte; "
        "throughput: turns (answer tokens) answered over the time from the first measured "
        'turn sent to the last answered. Set-ups: "1 replica" is one gateway on Redis; '
        '"4 shared" four gateways on one Redis (fleetgate); "4 private" four gateways, '
        "each on its own embedded store (every router keeping its own picture, as SGLang's "
        "or vLLM's routers do). Shared set-ups run the health-checker. Node columns: share "
        "of the answered turns.",
        "",
    ]
    for name, scenario in ordered(result["scenarios"]).items():
        stamp = ""
        if "date" in scenario:
            stamp = (
                f" Measured on {scenario['date']} by `{scenario['command']}` "
                f"({scenario['elapsed_s'] / 60:.1f} minutes)."
            )
        load = ""
        if busy(scenario) != "-":
            cpus = result["machine"]["cpus"]
            load = f" The machine's 1-minute load average after the runs: {busy(scenario)} "
            load += f"({cpus} CPUs, shared with other work)."
        lines += [
            f"## {TITLES.get(name, name)}",
            "",
            describe(result, name) + "." + stamp + load,
            "",
            md_table(*scenario_rows(scenario)),
            "",
        ]
        if name == "unequal":
            lines += [
                "Slow and fast p99: latency (and TTFT) p99 of the turns the slow and the "
                "fast nodes answered, medians of the runs. The slow nodes are 1.5x slower in "
                'prefill and decode alike, so 1.5x is their ratio without queueing. "no load '
                'bound": `cache_aware` with its load bound out of reach '
                "(`FLEETGATE_PREFIX_BALANCE=1000000`), to see what the bound does.",
                "",
            ]
    if result.get("targets"):
        lines += [
            "## Targets",
            "",
            "Two set-ups are compared run by run on the same turns: the figure is the median "
            "of the per-run ratios.",
            "",
            md_table(*target_rows(result), left=1),
            "",
        ]
    if charts:
        lines += ["## Charts", "", *(f"![{c}]({c})" for c in charts), ""]
    (out / "cache.md").write_text("\n".join(lines))
