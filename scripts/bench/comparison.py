"""The routing benchmark's first part: every strategy and replica set-up driven by the same
arrivals, run after run, and summarized."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from scripts.bench.figures import median_summary, summarize
from scripts.bench.fleet import EXPECTED_LOG, Fleet
from scripts.bench.harness import Child, log_findings, progress
from scripts.bench.load import client_session, drive, uniform_choice
from scripts.bench.scenario import Arrival, Scenario, Setup, comparison_setups, make_schedule


async def run_setup(
    fleet: Fleet,
    session: aiohttp.ClientSession,
    setup: Setup,
    schedule: Sequence[Arrival],
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[str]]:
    """Start the set-up's gateways (and checker), drive one schedule, stop them; the summary
    of the measured window and what the started processes logged."""
    started: list[Child] = []
    fleet.check()
    try:
        started += await fleet.shared_state(setup)
        gateways = fleet.start_gateways(setup)
        started += gateways
        await fleet.register(session, setup.registrars(gateways), setup.strategy)
        await fleet.wait_ready(session, gateways, len(fleet.nodes))
        for _spec, node in fleet.nodes.values():
            async with session.post(node.url + "/sim/reset") as resp:
                await resp.read()
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1
        results = await drive(session, schedule, uniform_choice([g.url for g in gateways]), t0)
        idle = await fleet.wait_nodes_idle(session)
        summary = summarize(results, args.warmup, args.warmup + args.duration, fleet.node_names())
        summary["nodes_idle_after"] = idle
        dead = [c.name for c in started if not c.alive()]
        if dead:
            summary["died"] = dead
    finally:
        fleet.procs.stop(started)
    return summary, log_findings(started, EXPECTED_LOG)


async def compare(fleet: Fleet, scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    """Every set-up (those of ``--only``), ``--runs`` times; by set-up key, its runs and the
    medians of their figures."""
    setups = comparison_setups(args.quick)
    if args.only:
        setups = [s for s in setups if any(word in s.key for word in args.only)]
    per_setup: dict[str, list[dict[str, Any]]] = {s.key: [] for s in setups}
    findings: dict[str, list[str]] = {s.key: [] for s in setups}
    span = args.warmup + args.duration
    async with client_session() as session:
        for run in range(args.runs):
            seed = args.seed + run
            schedule = make_schedule(
                seed, scenario.rate(), span, scenario.lengths, scenario.stream_fraction
            )
            for setup in setups:
                t = time.monotonic()
                summary, found = await run_setup(fleet, session, setup, schedule, args)
                summary["seed"] = seed
                per_setup[setup.key].append(summary)
                findings[setup.key] += found
                progress(
                    f"run {run + 1}/{args.runs} {setup.strategy:<21} {setup.mode:<10} "
                    f"mean {summary['mean_ms']:7.1f} ms  p99 {summary['p99_ms']:7.1f} ms  "
                    f"errors {summary['errors']}  ({time.monotonic() - t:.1f} s)"
                )
    out: dict[str, Any] = {}
    for setup in setups:
        runs = per_setup[setup.key]
        out[setup.key] = {
            "strategy": setup.strategy,
            "mode": setup.mode,
            "replicas": setup.replicas,
            "shared": setup.shared,
            "median": median_summary(runs),
            "runs": runs,
            "log_findings": findings[setup.key][:20],
            "log_findings_count": len(findings[setup.key]),
        }
    return out
