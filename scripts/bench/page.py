"""results.md: the routing benchmark's figures as a Markdown page, with how and where they
were measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scripts.bench.scale import FULL_SCAN_LIMIT
from scripts.bench.scenario import CHATS
from scripts.bench.tables import comparison_rows, drill_lines, md_table, scale_rows
from scripts.bench.targets import verdict


def write_markdown(result: dict[str, Any], out: Path, charts: list[str]) -> None:
    """Write ``out``/results.md: the scenario, the tables, the targets and the ``charts``."""
    sc = result["scenario"]
    lines = [
        "# Routing benchmark",
        "",
        f"Measured on {result['date']} by `{result['command']}` "
        f"({result['elapsed_s'] / 60:.1f} minutes; {result['machine']['cpus']} CPUs, "
        f"{result['machine']['cpu_model']}, Python {result['machine']['python']}). "
        "Raw figures of every run: [results.json](results.json). "
        'Regenerate everything here with `pip install -e ".[bench]"` and '
        "`python scripts/bench_routing.py` (`--quick` for a smoke run that writes nothing; "
        "`--replot docs/benchmarks/results.json` redraws the charts without measuring).",
        "",
        "Every figure on this page comes from simulated nodes. The same strategies on real "
        "llama.cpp `llama-server`s, whose prefix caches decide what a turn costs: "
        "[engines.md](engines.md) (`python scripts/bench_routing.py --engines llama`).",
        "",
        "## Scenario",
        "",
        "Simulated nodes (`gateway.sim.node`, continuous batching with a waiting queue), "
        "registered with `speed` = slots x tokens/s:",
        "",
        md_table(
            ["node", "slots", "tokens/s", "prefill ms", "speed", "capacity req/s", "share"],
            [
                [
                    n["name"],
                    str(n["slots"]),
                    f"{n['tokens_per_s']:g}",
                    f"{n['prefill_ms']:g}",
                    f"{n['speed']:g}",
                    f"{n['capacity_rps']:.2f}",
                    f"{n['capacity_share']:.0%}",
                ]
                for n in sc["nodes"]
            ],
            left=1,
        ),
        "",
        f"Open-loop Poisson arrivals at {sc['load']:.0%} of the fleet's capacity "
        f"({sc['rate_rps']:.1f} of {sc['capacity_rps']:.1f} req/s; exactly that many per "
        "second of each run: the process is conditioned on its expected count); output "
        "lengths lognormal, "
        f"median {sc['lengths']['median']:g} tokens, sigma {sc['lengths']['sigma']:g}, capped at "
        f"{sc['lengths']['cap']} (mean {sc['lengths']['mean']:.1f}); "
        f"{sc['stream_fraction']:.0%} of requests streamed; each request sent to a replica "
        "drawn uniformly at random (an L4 balancer), with an `X-Session-ID` of one of "
        f"{CHATS} conversations drawn uniformly (the keys of `session_affinity`); for the "
        "weighted strategies each node is registered with its speed relative to the slowest "
        "as its weight. Latency: scheduled arrival to last byte. "
        f"TTFT: to the first token event of a stream. Each figure is the median of "
        f"{result['runs']} runs of {result['duration_s']:g} s (after {result['warmup_s']:g} s "
        "of warm-up); every set-up gets the same arrivals in a given run.",
        "",
    ]
    if "comparison" in result:
        lines += [
            "## Strategies and replica set-ups",
            "",
            '"1 replica": one gateway on Redis. "4 shared": four gateways on one Redis '
            '(fleetgate). "4 private": four gateways, each on its own embedded store, each '
            "with every node registered (the LMDeploy-proxy situation). Shared set-ups run "
            "the health-checker. Node columns: share of the answered requests.",
            "",
            md_table(*comparison_rows(result)),
            "",
        ]
    if result["targets"]:
        lines += [
            "## Targets",
            "",
            "Two set-ups are compared run by run, on the same arrivals: a latency figure is "
            "the median of the per-run ratios of their mean latencies, minus 1.",
            "",
            md_table(
                ["target", "measured", "verdict"],
                [[k, t["text"], verdict(t["holds"])] for k, t in result["targets"].items()],
                left=1,
            ),
            "",
        ]
    if "scale" in result:
        lines += [
            "## Cost by fleet size",
            "",
            f"One replica on Redis, `min_expected_latency`, {result['scale']['rate_rps']:g} req/s "
            "of 16-token requests to an instant simulated node listening on as many loopback "
            "ports as there are registered nodes. Gateway CPU from `/proc/<pid>/stat`, Redis "
            "CPU from `INFO cpu`, script calls and their server time from `INFO commandstats`, "
            f"per request served. Up to {FULL_SCAN_LIMIT} candidates are all scored; past that a "
            "random sample of 8 is.",
            "",
            md_table(*scale_rows(result), left=1),
            "",
        ]
    if "drills" in result:
        lines += ["## Failure drills", ""]
        lines += [f"- {line}" for line in drill_lines(result)]
        lines += [""]
    if charts:
        lines += ["## Charts", ""]
        lines += [f"![{c}]({c})" for c in charts]
        lines += [""]
    (out / "results.md").write_text("\n".join(lines))
