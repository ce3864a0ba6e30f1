"""The cache benchmark's scenarios on simulated nodes (scripts/bench_cache.py): each set-up's
gateways started on the scenario's nodes, one schedule of chats driven through them, the
figures of the run, and every set-up run ``--runs`` times.

Invariants:

- Every set-up of a run gets the same turns (seed ``--seed + r``) and starts cold: an emptied
  Redis (or new private stores), new gateways, and nodes whose prefix caches were emptied
  (``POST /reset_prefix_cache``) once the gateways were ready, so neither side remembers an
  earlier set-up. The order of the set-ups rotates by one each run, so none always runs first
  on a machine that drifts.
- A turn goes to a gateway replica drawn uniformly (an L4 balancer): a conversation's turns
  spread over the replicas. Where replicas share Redis a health-checker runs beside them.
- The nodes' counters are read before and after a run: their difference is the run's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from scripts.bench.cache_figures import gateway_counters, median_cache_runs, summarize_cache_run
from scripts.bench.cache_nodes import CacheNode, CacheNodes, slow_names
from scripts.bench.cache_workload import CacheWorkload, make_cache_schedule
from scripts.bench.chat_load import drive_chats, request_body
from scripts.bench.chats import ChatTurn
from scripts.bench.fleet import EXPECTED_LOG, Fleet
from scripts.bench.harness import Child, StartupError, log_findings, progress
from scripts.bench.load import MODEL, client_session
from scripts.bench.scenario import Setup


@dataclass(frozen=True, slots=True)
class Variant(Setup):
    """A set-up whose gateways run with settings of their own, given as ``FLEETGATE_*``
    variables (``env``), and named by ``label``."""

    label: str = ""
    env: tuple[tuple[str, str], ...] = ()

    @property
    def mode(self) -> str:
        replicas = "1 replica" if self.replicas == 1 else f"{self.replicas} "
        if self.replicas > 1:
            replicas += "shared" if self.shared else "private"
        return f"{replicas}, {self.label}" if self.label else replicas

    @property
    def key(self) -> str:
        return f"{self.strategy}/{self.mode.replace(', ', '-').replace(' ', '-')}"


# cache_aware with its load bound out of reach: what the bound is worth on unequal nodes.
UNBOUNDED = Variant(
    "cache_aware", 4, True, "no load bound", (("FLEETGATE_PREFIX_BALANCE", "1000000"),)
)


@contextlib.contextmanager
def gateway_env(setup: Setup) -> Iterator[None]:
    """The set-up's own ``FLEETGATE_*`` variables in this process's environment, which the
    gateways it starts inherit, while the block runs."""
    env = dict(setup.env) if isinstance(setup, Variant) else {}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


CHAT_SETUPS = (
    Setup("cache_aware", 1, True),
    Setup("cache_aware", 4, True),
    Setup("cache_aware", 4, False),
    Setup("session_affinity", 4, True),
    Setup("min_expected_latency", 4, True),
    Setup("round_robin", 4, True),
)
UNEQUAL_SETUPS = (
    Setup("cache_aware", 4, True),
    UNBOUNDED,
    Setup("min_expected_latency", 4, True),
    Setup("round_robin", 4, True),
)
QUICK_SETUPS = (Setup("cache_aware", 1, True), Setup("cache_aware", 4, True))


_ID = re.compile(re.escape(socket.gethostname()) + r"-[0-9a-f]{8}\b")
_PATH = re.compile(r"(?<![\w.])(?:/[\w.+-]+){2,}")


def scrub(lines: Sequence[str]) -> list[str]:
    """Log lines fit for the saved results: a process id made of this machine's host name, and
    file paths, replaced."""
    return [_PATH.sub("<path>", _ID.sub("<host>-<id>", line)) for line in lines]


def rotated(setups: Sequence[Setup], run: int) -> list[Setup]:
    """``setups`` starting at position ``run`` (mod their number)."""
    k = run % len(setups) if setups else 0
    return [*setups[k:], *setups[:k]]


async def read_gateways(
    session: aiohttp.ClientSession, gateways: Sequence[Child]
) -> dict[str, float]:
    """The gateways' counters of the run (:func:`gateway_counters`), read before they stop."""
    pages = []
    for gw in gateways:
        async with session.get(gw.url + "/metrics") as resp:
            pages.append(await resp.text())
    return gateway_counters(pages)


def warmup_at(schedule: Sequence[ChatTurn], turns: int) -> float:
    """When the measured window opens: at the first turn past the first ``turns``."""
    return schedule[turns].at if len(schedule) > turns else float("inf")


@dataclass(frozen=True, slots=True)
class SimScenario:
    """A scenario on simulated nodes: its name, nodes, set-ups, and the offered load."""

    name: str
    nodes: tuple[CacheNode, ...]
    setups: tuple[Setup, ...]
    load: float  # fraction of the fleet's cold capacity

    def cold_capacity_rps(self, workload: CacheWorkload) -> float:
        return sum(n.cold_capacity_rps(workload) for n in self.nodes)


async def run_sim_setup(
    fleet: Fleet,
    nodes: CacheNodes,
    session: aiohttp.ClientSession,
    setup: Setup,
    schedule: Sequence[ChatTurn],
    seed: int,
    workload: CacheWorkload,
    warmup_turns: int,
) -> tuple[dict[str, Any], list[str]]:
    """Start the set-up's gateways (and checker), drive one schedule, stop them; the run's
    figures and what the started processes logged."""
    started: list[Child] = []
    fleet.check()
    chats = workload.chats()
    try:
        started += await fleet.shared_state(setup)
        with gateway_env(setup):
            gateways = fleet.start_gateways(setup)
        started += gateways
        await nodes.register(session, setup.registrars(gateways))
        await fleet.wait_ready(session, gateways, len(nodes.specs))
        await nodes.wait_idle(session)
        await nodes.reset_caches(session)
        before = await nodes.counters(session)
        t0 = asyncio.get_running_loop().time() + 0.1

        def body_of(turn: ChatTurn, answers: Sequence[str]) -> dict[str, Any]:
            return request_body(MODEL, chats, seed, turn, answers)

        results = await drive_chats(session, schedule, body_of, [g.url for g in gateways], t0)
        idle = await nodes.wait_idle(session)
        counted = nodes.between(before, await nodes.counters(session))
        summary = summarize_cache_run(
            results,
            warmup_at(schedule, warmup_turns),
            nodes.names(),
            counted,
            slow_names(list(nodes.specs.values())),
            await read_gateways(session, gateways),
        )
        summary.update(
            seed=seed,
            node_tokens={n: [t.prompt, t.cached] for n, t in counted.items()},
            nodes_idle_after=idle,
            loadavg_1m=os.getloadavg()[0],  # how busy the shared machine was
        )
        dead = [c.name for c in started if not c.alive()]
        if dead:
            summary["died"] = dead
    finally:
        fleet.procs.stop(started)
    return summary, scrub(log_findings(started, EXPECTED_LOG))


async def _run_twice(
    fleet: Fleet,
    nodes: CacheNodes,
    session: aiohttp.ClientSession,
    setup: Setup,
    schedule: Sequence[ChatTurn],
    seed: int,
    workload: CacheWorkload,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[str]]:
    """:func:`run_sim_setup`, once more if a process it needed went away (on a shared machine,
    a node can be killed from outside): the dead nodes started again, the failure recorded in
    the run's ``retried``; a second failure is raised."""
    try:
        return await run_sim_setup(
            fleet, nodes, session, setup, schedule, seed, workload, args.warmup_turns
        )
    except (aiohttp.ClientError, StartupError) as exc:
        if fleet.interrupted:
            raise
        failure = f"{type(exc).__name__}: {exc}"[:300]
        dead = nodes.dead()
        progress(f"{setup.key} seed {seed} failed ({failure}); dead nodes: {dead}; once more")
        nodes.restart_dead()
    summary, found = await run_sim_setup(
        fleet, nodes, session, setup, schedule, seed, workload, args.warmup_turns
    )
    summary["retried"] = {"failure": failure, "dead_nodes": dead}
    return summary, found


async def run_sim_scenario(
    fleet: Fleet,
    scenario: SimScenario,
    workload: CacheWorkload,
    per_token: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Start the scenario's nodes, run each set-up ``args.runs`` times, stop the nodes; the
    scenario's description and, by set-up key, its runs and their medians."""
    cold = scenario.cold_capacity_rps(workload)
    rate = scenario.load * cold
    nodes = CacheNodes(fleet.procs, scenario.nodes, per_token)
    out: dict[str, Any] = {
        "nodes": [n.describe() for n in scenario.nodes],
        "gateway_cache_blocks": {},
        "cold_capacity_rps": cold,
        "load": scenario.load,
        "rate_rps": rate,
        "setups": [s.key for s in scenario.setups],
    }
    per_setup: dict[str, list[dict[str, Any]]] = {s.key: [] for s in scenario.setups}
    findings: dict[str, list[str]] = {s.key: [] for s in scenario.setups}
    nodes.start()
    out["gateway_cache_blocks"] = {name: nodes.gateway_blocks(name) for name in nodes.specs}
    try:
        async with client_session() as session:
            for run in range(args.runs):
                seed = args.seed + run
                schedule = make_cache_schedule(seed, rate, workload)
                out["span_s"] = schedule[-1].at if schedule else 0.0
                out["turns"] = len(schedule)
                for setup in rotated(scenario.setups, run):
                    t = time.monotonic()
                    summary, found = await _run_twice(
                        fleet, nodes, session, setup, schedule, seed, workload, args
                    )
                    per_setup[setup.key].append(summary)
                    findings[setup.key] += found
                    progress(
                        f"{scenario.name} run {run + 1}/{args.runs} {setup.strategy:<21} "
                        f"{setup.mode:<10} hits {summary['hit_rate']:6.1%}  TTFT mean "
                        f"{summary['ttft_mean_ms']:6.0f} ms  p90 {summary['ttft_p90_ms']:6.0f} ms"
                        f"  latency mean {summary['mean_ms']:6.0f} ms  errors "
                        f"{summary['errors']}  ({time.monotonic() - t:.0f} s)"
                    )
        out["log_findings_nodes"] = scrub(log_findings(nodes.children.values(), EXPECTED_LOG))[:20]
    finally:
        nodes.stop()
    out["comparison"] = {
        setup.key: {
            "strategy": setup.strategy,
            "mode": setup.mode,
            "replicas": setup.replicas,
            "shared": setup.shared,
            "median": median_cache_runs(per_setup[setup.key]),
            "runs": per_setup[setup.key],
            "log_findings": findings[setup.key][:20],
            "log_findings_count": len(findings[setup.key]),
        }
        for setup in scenario.setups
    }
    return out
