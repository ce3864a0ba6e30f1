"""The admission benchmark's runs (scripts/bench_admission.py): the simulated nodes started once;
in each run, the high-priority stream alone on an idle fleet, then every set-up under load.

A phase (the idle fleet, or a set-up) empties Redis, registers the nodes and the client keys
with the ops CLI as an operator does (``fleetgate nodes add URL --model M [--max-inflight N]``,
``fleetgate keys add NAME --key SECRET --share 1``, through ``FLEETGATE_REDIS_URL``), starts
the gateway replicas on Redis, resets the nodes once they are idle (their ``peak`` and idle
gaps are then the phase's own), drives the load, reads the gateways' ``/metrics`` and, once
the nodes are idle again, their ``/sim/stats``, and stops the replicas.

Invariants: every phase of a run gets the same high-priority arrivals and answer lengths (seed
``--seed + r``); the idle fleet runs first and the set-ups' order rotates each run, so none
always runs first on a machine that drifts; the idle fleet is registered as the judged set-up.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from scripts.bench.admission_figures import median_runs, summarize_run
from scripts.bench.admission_load import Drive, drive_run
from scripts.bench.admission_workload import (
    HIGH,
    KEYS,
    AdmissionScenario,
    AdmissionSetup,
    HighArrival,
    high_schedule,
    idle_setup,
)
from scripts.bench.cache_runs import scrub
from scripts.bench.fleet import EXPECTED_LOG, Fleet
from scripts.bench.harness import (
    ROOT,
    START_TIMEOUT_S,
    Child,
    StartupError,
    free_port,
    log_findings,
    progress,
)
from scripts.bench.load import MODEL, client_session
from scripts.bench.scenario import NodeSpec

SECRETS = {key: f"bench-admission-{key}-0123456789abcdef" for key in (*KEYS, HIGH)}


class AdmissionFleet:
    """The benchmark's nodes on a :class:`Fleet`, and its phases."""

    def __init__(self, fleet: Fleet, scenario: AdmissionScenario) -> None:
        self.fleet = fleet
        self.scenario = scenario

    def start_nodes(self) -> None:
        """Start the simulated nodes: as many slots as their max_inflight."""
        s = self.scenario
        for i in range(s.nodes):
            self.fleet.start_node(NodeSpec(f"node-{i + 1}", s.max_inflight, s.tokens_per_s, 0.0))

    def restart_dead_nodes(self) -> list[str]:
        """Start again, on their ports, the nodes that died; their names."""
        dead = [name for name, (_, child) in self.fleet.nodes.items() if not child.alive()]
        for name in dead:
            spec, child = self.fleet.nodes[name]
            self.fleet.start_node(spec, child.port)
        return dead

    async def ops(self, *args: str) -> None:
        """One ``fleetgate`` ops command on the fleet's Redis; StartupError if it fails."""
        command = [sys.executable, "-m", "gateway.cli", *args]
        env = {**os.environ, "FLEETGATE_REDIS_URL": self.fleet.redis_url}
        done = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
        )
        if done.returncode != 0:
            raise StartupError(f"fleetgate {' '.join(args[:2])} failed: {done.stderr[-500:]}")

    async def register(self, setup: AdmissionSetup) -> None:
        """The nodes (with their capacity when the set-up caps them) and the three client keys,
        every one of share 1."""
        calls = []
        for _spec, node in self.fleet.nodes.values():
            extra = ["--max-inflight", str(self.scenario.max_inflight)] if setup.capped else []
            calls.append(self.ops("nodes", "add", node.url, "--model", MODEL, *extra))
        for key, secret in SECRETS.items():
            calls.append(self.ops("keys", "add", f"key-{key}", "--key", secret, "--share", "1"))
        await asyncio.gather(*calls)

    def start_gateways(self, setup: AdmissionSetup) -> list[Child]:
        """The set-up's gateway replicas on the fleet's Redis, listening."""
        children = []
        for i in range(self.scenario.replicas):
            port = free_port()
            argv = [self.fleet.py, "-m", "gateway", "--port", str(port), "--redis-url"]
            argv += [self.fleet.redis_url, "--replica-id", f"gw-{i}", "--log-level", "warning"]
            argv += ["--access-log", "false", "--shutdown-timeout", "2"]
            if setup.reserve is not None:
                argv += ["--priority-reserve", f"{setup.reserve:g}"]
            children.append(self.fleet.procs.start(f"gw-{i}-{setup.key}", argv, port))
        for child in children:
            self.fleet.procs.wait_port(child)
        return children

    async def wait_ready(self, session: aiohttp.ClientSession, gateways: Sequence[Child]) -> None:
        """Wait until every replica lists the model to a client key (it read the registry)."""
        headers = {"Authorization": f"Bearer {SECRETS[KEYS[0]]}"}
        deadline = time.monotonic() + START_TIMEOUT_S
        for gw in gateways:
            while True:
                async with session.get(gw.url + "/v1/models", headers=headers) as resp:
                    listing = await resp.json() if resp.status == 200 else {}
                if any(m.get("id") == MODEL for m in listing.get("data", [])):
                    break
                if time.monotonic() > deadline or not gw.alive():
                    raise StartupError(f"{gw.name} never listed {MODEL}:\n{gw.tail()}")
                await asyncio.sleep(0.05)

    async def reset_nodes(self, session: aiohttp.ClientSession) -> None:
        """Wait until the nodes are idle, then zero their counters, peaks and idle gaps."""
        await self.fleet.wait_nodes_idle(session)
        for _spec, node in self.fleet.nodes.values():
            async with session.post(node.url + "/sim/reset") as resp:
                resp.raise_for_status()

    async def phase(
        self,
        session: aiohttp.ClientSession,
        setup: AdmissionSetup,
        seed: int,
        schedule: Sequence[HighArrival],
        open_below: int,
    ) -> tuple[dict[str, Any], list[str]]:
        """One phase (the module's docstring): its figures and what its replicas logged."""
        self.fleet.check()
        gateways: list[Child] = []
        try:
            await self.fleet.reset_redis()
            await self.register(setup)
            gateways = self.start_gateways(setup)
            await self.wait_ready(session, gateways)
            await self.reset_nodes(session)
            drive = Drive([g.url for g in gateways], SECRETS, self.scenario, seed, setup.loops)
            outcomes, samples, wall0 = await drive_run(session, drive, schedule)
            pages = []
            for gw in gateways:
                async with session.get(gw.url + "/metrics") as resp:
                    pages.append(await resp.text())
            idle = await self.fleet.wait_nodes_idle(session)
            stats = await self.fleet.sim_stats(session)
            window = (self.scenario.warmup_s, self.scenario.duration_s)
            summary = summarize_run(
                outcomes,
                window,
                stats,
                wall0=wall0,
                open_below=open_below,
                pages=pages,
                samples=samples,
            )
            summary.update(seed=seed, nodes_idle_after=idle, loadavg_1m=os.getloadavg()[0])
            dead = [c.name for c in gateways if not c.alive()]
            if dead:
                summary["died"] = dead
        finally:
            self.fleet.procs.stop(gateways)
        return summary, scrub(log_findings(gateways, EXPECTED_LOG))


async def _phase_twice(
    nodes: AdmissionFleet,
    session: aiohttp.ClientSession,
    setup: AdmissionSetup,
    seed: int,
    schedule: Sequence[HighArrival],
    open_below: int,
) -> tuple[dict[str, Any], list[str]]:
    """:meth:`AdmissionFleet.phase`, once more if it failed to start or a node went away (on a
    shared machine a process can be killed from outside); the failure kept in ``retried``."""
    try:
        return await nodes.phase(session, setup, seed, schedule, open_below)
    except (aiohttp.ClientError, StartupError) as exc:
        if nodes.fleet.interrupted:
            raise
        failure = f"{type(exc).__name__}: {exc}"[:300]
        dead = nodes.restart_dead_nodes()
        progress(f"{setup.key} seed {seed} failed ({failure}); dead nodes: {dead}; once more")
    summary, found = await nodes.phase(session, setup, seed, schedule, open_below)
    summary["retried"] = {"failure": failure, "dead_nodes": dead}
    return summary, found


def _line(setup: AdmissionSetup, run: int, runs: int, s: dict[str, Any], took: float) -> str:
    return (
        f"run {run + 1}/{runs} {setup.label:<32} high TTFT p90 {s['high_ttft_p90_ms']:6.0f} ms  "
        f"a {s['throughput_a']:5.2f}/s b {s['throughput_b']:5.2f}/s  peak {s['peak_max']:.0f}  "
        f"gap p99 {s['open_gap_p99_ms']:5.1f} ms  lost {s['lost']:.0f}  ({took:.0f} s)"
    )


async def run_admission(
    fleet: Fleet,
    scenario: AdmissionScenario,
    setups: Sequence[AdmissionSetup],
    runs: int,
    seed: int,
) -> dict[str, Any]:
    """Start the nodes, run the idle fleet and every set-up ``runs`` times; by phase its runs,
    their medians and its log findings."""
    nodes = AdmissionFleet(fleet, scenario)
    idle = idle_setup(setups[0])
    per: dict[str, list[dict[str, Any]]] = {s.key: [] for s in (idle, *setups)}
    found: dict[str, list[str]] = {s.key: [] for s in (idle, *setups)}
    nodes.start_nodes()
    async with client_session(scenario.client_timeout_s) as session:
        for run in range(runs):
            schedule = high_schedule(seed + run, scenario)
            k = run % len(setups)  # the set-ups' order rotates each run
            for setup in [idle, *setups[k:], *setups[:k]]:
                t = time.monotonic()
                # Without a capacity, every slot of a node is open to any request.
                open_below = scenario.normal_slots(setup.reserve) if setup.capped else 10**9
                summary, logged = await _phase_twice(
                    nodes, session, setup, seed + run, schedule, open_below
                )
                per[setup.key].append(summary)
                found[setup.key] += logged
                progress(_line(setup, run, runs, summary, time.monotonic() - t))
    out: dict[str, Any] = {"idle": _row(idle, per, found), "setups": {}}
    for setup in setups:
        out["setups"][setup.key] = _row(setup, per, found)
    children = [child for _spec, child in fleet.nodes.values()]
    out["log_findings_nodes"] = scrub(log_findings(children, EXPECTED_LOG))[:20]
    return out


def _row(
    setup: AdmissionSetup, per: dict[str, list[dict[str, Any]]], found: dict[str, list[str]]
) -> dict[str, Any]:
    return {
        "label": setup.label,
        "capped": setup.capped,
        "reserve": setup.reserve,
        "loops": setup.loops,
        "runs": per[setup.key],
        "median": median_runs(per[setup.key]),
        "log_findings": found[setup.key][:20],
        "log_findings_count": len(found[setup.key]),
    }
