"""The routing benchmark's third part, failure drills: kill -9 a node mid-run (who still
tries it, for how long, what fails), and kill -9 a replica mid-run (its leases expire, the
in-flight counts come back to zero)."""

from __future__ import annotations

import argparse
import asyncio
import math
import re
from collections import Counter
from typing import Any

import aiohttp

from scripts.bench.figures import summarize_window
from scripts.bench.fleet import EXPECTED_LOG, Fleet
from scripts.bench.harness import Child, log_findings, progress
from scripts.bench.load import client_session, drive, uniform_choice
from scripts.bench.scenario import Arrival, Scenario, Setup, make_schedule

_ATTEMPTS = re.compile(
    r'^fleetgate_upstream_attempts_total\{node="([^"]*)",result="([^"]*)"\} (\S+)'
)
_SIMPLE = re.compile(
    r"^(fleetgate_retries_total|fleetgate_stream_errors_total\S*|"
    r"fleetgate_ejections_total\S*) (\S+)"
)


async def gateway_metrics(session: aiohttp.ClientSession, gw: Child) -> dict[str, float]:
    """Attempts per node ("attempts:<node>") and a few counters from one replica's /metrics."""
    out: dict[str, float] = {}
    try:
        async with session.get(gw.url + "/metrics") as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return out
    for line in text.splitlines():
        if m := _ATTEMPTS.match(line):
            key = f"attempts:{m.group(1)}"
            out[key] = out.get(key, 0.0) + float(m.group(3))
        elif m := _SIMPLE.match(line):
            name = m.group(1).split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(m.group(2))
    return out


async def drill_node_kill(
    fleet: Fleet, scenario: Scenario, args: argparse.Namespace, victim_name: str, shared: bool
) -> dict[str, Any]:
    """kill -9 one node mid-run; who still tried it, and for how long; what failed."""
    setup = Setup("min_expected_latency", 4, shared)
    span = args.drill_duration
    kill_at = span / 3
    schedule = make_schedule(
        args.seed, scenario.rate(args.drill_load), span, scenario.lengths, scenario.stream_fraction
    )
    spec, victim = fleet.nodes[victim_name]
    fleet.check()
    started: list[Child] = []
    timeline: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    async with client_session() as session:
        try:
            if shared:
                await fleet.reset_redis()
                started.append(fleet.start_checker())
            gateways = fleet.start_gateways(setup, tag="-drill-node")
            started += gateways
            await fleet.register(session, gateways if not shared else gateways[:1])
            await fleet.wait_ready(session, gateways, len(fleet.nodes))
            t0 = loop.time() + 0.1

            async def watch() -> None:
                async with client_session() as ws:
                    await asyncio.sleep(t0 + kill_at - loop.time())
                    before = [await gateway_metrics(ws, g) for g in gateways]
                    stats = (await fleet.sim_stats(ws)).get(victim_name, {})
                    fleet.procs.kill(victim)
                    t_kill = loop.time() - t0
                    key = f"attempts:{victim.url}"
                    base = [m.get(key, 0.0) for m in before]
                    last = list(base)
                    last_attempt = [math.nan] * len(gateways)
                    events: list[list[float]] = []  # [s after start, replica, attempts seen]
                    unhealthy_at = ejected_at = math.nan
                    while loop.time() < t0 + span + 2:
                        await asyncio.sleep(0.1)
                        now = loop.time() - t0
                        for i, g in enumerate(gateways):
                            value = (await gateway_metrics(ws, g)).get(key, 0.0)
                            if value != last[i]:
                                events.append([round(now, 2), i, value - last[i]])
                                last[i], last_attempt[i] = value, now
                        if shared and math.isnan(unhealthy_at):
                            async with ws.get(gateways[1].url + "/nodes/status") as resp:
                                entry = (await resp.json()).get(victim.url, {})
                            if entry.get("state") == "unhealthy":
                                unhealthy_at = now
                            if math.isnan(ejected_at) and entry.get("ejected_until_ms", 0) > 0:
                                ejected_at = now
                    after = [await gateway_metrics(ws, g) for g in gateways]
                    timeline.update(
                        {
                            "kill_at_s": t_kill,
                            "in_flight_on_victim_at_kill": stats.get("running", 0)
                            + stats.get("waiting", 0),
                            "attempts_after_kill_per_replica": [
                                last[i] - base[i] for i in range(len(gateways))
                            ],
                            "last_attempt_after_kill_s": [
                                (t - t_kill) if not math.isnan(t) else None for t in last_attempt
                            ],
                            "attempt_events": events,
                            "unhealthy_after_s": unhealthy_at - t_kill,
                            "ejected_seen_after_s": ejected_at - t_kill,
                            "retries": sum(a.get("fleetgate_retries_total", 0.0) for a in after),
                            "ejections": sum(
                                a.get("fleetgate_ejections_total", 0.0) for a in after
                            ),
                            "stream_errors": sum(
                                a.get("fleetgate_stream_errors_total", 0.0) for a in after
                            ),
                        }
                    )

            watcher = asyncio.ensure_future(watch())
            choose = uniform_choice([g.url for g in gateways])
            results = await drive(session, schedule, choose, t0)
            await watcher
            survivors_idle = await fleet.wait_nodes_idle(session)
        finally:
            fleet.procs.stop(started)
            fleet.procs.kill(victim)
            del fleet.nodes[victim_name]
            fleet.start_node(spec, victim.port)  # back for the next drill, at the same URL
    t_kill = timeline["kill_at_s"]
    cut = [r for r in results if r.at < t_kill and r.end >= t_kill and not r.ok]
    after_kill = [r for r in results if r.at >= t_kill]
    last = [t for t in timeline["last_attempt_after_kill_s"] if t is not None]
    names = fleet.node_names()
    return {
        "mode": setup.mode,
        "victim": victim_name,
        "load": args.drill_load,
        "duration_s": span,
        **timeline,
        "requests": len(results),
        "failed": sum(1 for r in results if not r.ok),
        "failed_cut_at_kill": len(cut),
        "failed_after_kill": sum(1 for r in after_kill if not r.ok),
        "error_kinds": dict(Counter(r.error for r in results if not r.ok)),
        "answered_by_victim_after_kill": sum(
            1 for r in after_kill if r.ok and names.get(r.node) == victim_name
        ),
        "no_replica_routes_after_s": max(last) if last else 0.0,
        "before_kill": summarize_window(results, 0.0, t_kill),
        "after_kill": summarize_window(results, t_kill, span),
        "survivors_idle_after": survivors_idle,
        "points": [[round(r.at, 3), round(r.latency * 1000, 1) if r.ok else None] for r in results],
        "log_findings": log_findings(started, EXPECTED_LOG)[:10],
    }


async def _live_leases_of(fleet: Fleet, replica: str) -> tuple[int, int]:
    """Unexpired leases held by ``replica``, and by everyone, across all registered nodes."""
    sec, usec = await fleet.r.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    ids = sorted(str(i) for i in await fleet.r.smembers(fleet.keys.nodes))
    async with fleet.r.pipeline(transaction=False) as pipe:
        for node_id in ids:
            pipe.zrangebyscore(fleet.keys.leases(node_id), now_ms, "+inf")
        replies = await pipe.execute()
    members = [m for reply in replies for m in reply]
    return sum(1 for m in members if m.startswith(replica + ":")), len(members)


async def drill_replica_kill(
    fleet: Fleet, scenario: Scenario, args: argparse.Namespace
) -> dict[str, Any]:
    """kill -9 one of 4 shared replicas mid-run: its leases must expire, counts return to 0."""
    lease_s = args.drill_lease
    setup = Setup("min_expected_latency", 4, True)
    span = args.drill_duration
    kill_at = span / 3
    schedule = make_schedule(
        args.seed, scenario.rate(args.drill_load), span, scenario.lengths, scenario.stream_fraction
    )
    fleet.check()
    started: list[Child] = []
    timeline: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    async with client_session() as session:
        try:
            await fleet.reset_redis()
            started.append(fleet.start_checker())
            gateways = fleet.start_gateways(setup, lease_s=lease_s, tag="-drill-replica")
            started += gateways
            await fleet.register(session, gateways[:1])
            await fleet.wait_ready(session, gateways, len(fleet.nodes))
            victim = gateways[0]
            alive = [True] * len(gateways)

            def choose(arrival: Arrival) -> tuple[int, str]:
                up = [i for i, a in enumerate(alive) if a]  # the L4 balancer drops the dead one
                i = up[min(int(arrival.u * len(up)), len(up) - 1)]
                return i, gateways[i].url

            t0 = loop.time() + 0.1

            async def watch() -> None:
                async with client_session() as ws:
                    await asyncio.sleep(t0 + kill_at - loop.time())
                    # Kill it while it has requests in flight (at most 3 s later).
                    held, total = await _live_leases_of(fleet, "gw-0")
                    give_up = loop.time() + 3
                    while held < 2 and loop.time() < give_up:
                        await asyncio.sleep(0.02)
                        held, total = await _live_leases_of(fleet, "gw-0")
                    fleet.procs.kill(victim)
                    alive[0] = False
                    t_kill = loop.time() - t0
                    series: list[tuple[float, int, int]] = [(0.0, held, total)]
                    zero_at = replicas_at = math.nan
                    deadline = t0 + t_kill + lease_s * 2 + 3
                    while loop.time() < deadline:
                        await asyncio.sleep(0.05)
                        now = loop.time() - t0 - t_kill
                        mine, total = await _live_leases_of(fleet, "gw-0")
                        series.append((round(now, 3), mine, total))
                        if mine == 0 and math.isnan(zero_at):
                            zero_at = now
                        if math.isnan(replicas_at):
                            async with ws.get(gateways[1].url + "/nodes/replicas") as resp:
                                listed = (await resp.json()).get("replicas", {})
                            if "gw-0" not in listed:
                                replicas_at = now
                        if not math.isnan(zero_at) and not math.isnan(replicas_at):
                            break
                    timeline.update(
                        {
                            "kill_at_s": t_kill,
                            "leases_of_killed_replica_at_kill": held,
                            "leases_total_at_kill": total,
                            "leases_expired_after_s": zero_at,
                            "dropped_from_replicas_after_s": replicas_at,
                            "lease_series": series[:: max(1, len(series) // 60)],
                        }
                    )

            watcher = asyncio.ensure_future(watch())
            results = await drive(session, schedule, choose, t0)
            await watcher
            last_end = max((r.end for r in results if not math.isnan(r.end)), default=0.0)
            zero_after = math.nan
            unfinished: dict[str, int] = {}
            deadline = loop.time() + lease_s * 2 + 5
            while loop.time() < deadline:
                async with session.get(gateways[1].url + "/nodes/status") as resp:
                    status = await resp.json()
                unfinished = {url: int(v["unfinished"]) for url, v in status.items()}
                if sum(unfinished.values()) == 0:
                    zero_after = loop.time() - t0 - last_end
                    break
                await asyncio.sleep(0.05)
            idle = await fleet.wait_nodes_idle(session)
            async with session.get(gateways[1].url + "/nodes/replicas") as resp:
                replicas = (await resp.json()).get("replicas", {})
        finally:
            fleet.procs.stop(started)
    t_kill = timeline["kill_at_s"]
    through_victim = [r for r in results if r.replica == 0]
    after_kill = [r for r in results if r.at >= t_kill]
    return {
        "mode": setup.mode,
        "lease_s": lease_s,
        "load": args.drill_load,
        "duration_s": span,
        **timeline,
        "requests": len(results),
        "failed": sum(1 for r in results if not r.ok),
        "failed_through_killed_replica": sum(1 for r in through_victim if not r.ok),
        "failed_after_kill_elsewhere": sum(1 for r in after_kill if not r.ok and r.replica != 0),
        "error_kinds": dict(Counter(r.error for r in results if not r.ok)),
        "unfinished_zero_after_last_response_s": zero_after,
        "unfinished_at_end": unfinished,
        "replicas_at_end": sorted(replicas),
        "nodes_idle_after": idle,
        "before_kill": summarize_window(results, 0.0, t_kill),
        "after_kill": summarize_window(results, t_kill, span),
        "log_findings": log_findings(started, EXPECTED_LOG)[:10],
    }


async def drills(fleet: Fleet, scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    """The node drill on shared replicas (and, unless ``--quick``, on private ones), then the
    replica drill; by drill, its figures."""
    victim = args.drill_victim
    out: dict[str, Any] = {}
    out["node_kill_shared"] = await drill_node_kill(fleet, scenario, args, victim, shared=True)
    progress(_drill_line("node kill, 4 shared + checker", out["node_kill_shared"]))
    if not args.quick:
        out["node_kill_private"] = await drill_node_kill(
            fleet, scenario, args, victim, shared=False
        )
        progress(_drill_line("node kill, 4 private", out["node_kill_private"]))
    out["replica_kill"] = await drill_replica_kill(fleet, scenario, args)
    d = out["replica_kill"]
    progress(
        f"drill replica kill: {d['leases_of_killed_replica_at_kill']} leases orphaned, expired "
        f"after {d['leases_expired_after_s']:.2f} s; failed {d['failed']}"
    )
    return out


def _drill_line(title: str, d: dict[str, Any]) -> str:
    return (
        f"drill {title}: failed {d['failed']} of {d['requests']} "
        f"({d['failed_cut_at_kill']} cut at the kill), last attempt on the dead node "
        f"{d['no_replica_routes_after_s']:.2f} s after the kill"
    )
