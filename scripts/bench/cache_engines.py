"""The cache benchmark's chats on real engines (scripts/bench_cache.py, part ``engines``):
llama.cpp ``llama-server``s serving the random ``llama-big`` model, whose prefix caches,
tokenizer and ``cached_tokens`` are their own, behind gateway replicas sharing a real Redis;
``cache_aware`` against ``min_expected_latency`` and ``round_robin`` on the same chats.

It reuses the routing benchmark's engine scenario (scripts/bench/llama_nodes.py: the engines,
started from the engines cache and restarted empty; scripts/bench/calibration.py: their cold
and cached first turns, the rate they can take and the cache capacity the gateways are told)
with this benchmark's bounded chats (scripts/bench/cache_workload.py) and figures.

Invariants:

- Every set-up of a run starts on engines restarted empty, an emptied Redis, a new
  health-checker and new gateways, and gets the same turns (seed ``--seed + r``); the order of
  the set-ups rotates by one each run.
- The offered rate is ``--engine-load`` of the fleet's cold capacity, measured first: every
  strategy can serve it, however few prefixes it reuses.
- Hit rates are the engines' own: the usage they answered with, and their counters since
  their restart, which must add up to the usage of every answered turn.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from scripts.bench.cache_figures import median_cache_runs, summarize_cache_run
from scripts.bench.cache_runs import read_gateways, rotated, scrub, warmup_at
from scripts.bench.cache_targets import CA, MEL
from scripts.bench.cache_workload import CacheWorkload, make_cache_schedule
from scripts.bench.calibration import DEFAULT_BLOCK_BYTES, Calibration, calibrate
from scripts.bench.chat_load import drive_chats, request_body
from scripts.bench.chats import ChatTurn
from scripts.bench.fleet import EXPECTED_LOG, Fleet
from scripts.bench.harness import Child, StartupError, log_findings, progress
from scripts.bench.llama_nodes import LlamaFleet, LlamaSpec, prepare
from scripts.bench.load import client_session
from scripts.bench.scenario import Setup

ENGINE_STRATEGIES = (CA, MEL, "round_robin")
# Smaller than the simulated chats: a cold first turn takes a llama-big engine about 0.5 s on
# one thread. 24 chats: three to each system prompt, so a prompt's prefill is paid once and
# reused, as in the simulated chats, rather than paid by nearly every chat.
ENGINE_WORKLOAD = CacheWorkload(
    prompts=8,
    prompt_words=800,
    conversations=24,
    min_turns=4,
    max_turns=6,
    user_words=40,
    answer_tokens=16,
    open_at_once=6,
    min_gap_s=2.0,
    stream_fraction=1.0,
)


# Four alike engines of one thread each (sharing the machine's two cores), whose prompt caches
# (48 MiB: some 3,000 tokens of llama-big's 16 KiB each, plus the slot's own prompt) hold three
# or four chats' prompts each: the six chats open at once and the eight system prompts do not
# fit in one engine, and do in the four when each keeps its own quarter, as a GPU's KV memory
# holds a part of a real fleet's prefixes. Measured on this machine kind, one run each, 24 chats
# (cache_aware's share of prompt tokens cached against the cache-blind strategies'): two engines
# of 96 MiB keep nearly everything, a cache-blind router hits 75% too; two of 72 MiB, 85%
# against 55-70% (mean TTFT 1.4x to 2.8x, run by run); four of 48 MiB at 40% load, 84% against
# 50-52% (2.3x), and 60% on private stores (1.8x); four of 40 MiB, cache_aware's own quarter no
# longer fits (78%). Longer chats (5 to 8 turns of 80-word questions, so that a chat's own
# history weighs more) on four of 64 MiB at 50% load, 3 runs: 74.9% against 43% (mean TTFT
# 1.94x and 2.07x) and 55.1% on private stores (1.67x): no wider gap than these chats.
# Every prompt saved (``--slot-prompt-similarity 0``): with llama-server's default (0.1) a turn
# takes the slot whose prompt shares a tenth of its own and, when it keeps half that prompt or
# more, overwrites the rest unsaved, so a chat that shares its system prompt with the one
# before it on an engine loses its history there: the chats cache_aware groups by system
# prompt lost most. Measured in pairs of runs, private stores' mean TTFT over cache_aware's on
# sharing replicas: 1.18x and 1.65x with the default, 2.04x and 1.71x with every prompt saved.
CACHE_LLAMAS = tuple(LlamaSpec(f"llama-{i}", 1, 1, 48, save_prompts=True) for i in range(1, 5))


def engine_setups(replicas: int) -> list[Setup]:
    """``cache_aware`` on 1 replica, the strategies compared on ``replicas`` (2 or more)
    replicas sharing Redis, and ``cache_aware`` on as many replicas each on its own embedded
    store (every router keeping its own picture)."""
    shared = [Setup(s, replicas, True) for s in ENGINE_STRATEGIES]
    return [Setup(CA, 1, True), *shared, Setup(CA, replicas, False)]


async def _register(
    session: aiohttp.ClientSession,
    gateway: Child,
    llamas: LlamaFleet,
    calibration: Calibration,
) -> None:
    for name, spec in llamas.specs.items():
        payload = {
            "url": llamas.url(name),
            "status": {
                "models": [llamas.build.model],
                # Alike engines alike: a calibration's noise must not rank them.
                "speed": calibration.speed(spec, list(llamas.specs.values())),
            },
            "cache_blocks": calibration.cache_blocks(spec, llamas.build.model, DEFAULT_BLOCK_BYTES),
        }
        async with session.post(gateway.url + "/nodes/add", json=payload) as resp:
            if resp.status != 200:
                raise StartupError(f"/nodes/add answered {resp.status}: {await resp.text()}")


async def run_engine_setup(
    fleet: Fleet,
    llamas: LlamaFleet,
    session: aiohttp.ClientSession,
    setup: Setup,
    schedule: Sequence[ChatTurn],
    seed: int,
    workload: CacheWorkload,
    calibration: Calibration,
    warmup_turns: int,
    cache_unit: str,
) -> tuple[dict[str, Any], list[str]]:
    """Restart the engines, start the checker and gateways, drive one schedule, stop them; the
    run's figures with the engines' own counts, and what was logged."""
    started: list[Child] = []
    fleet.check()
    model = llamas.build.model
    chats = workload.chats()
    try:
        await llamas.restart(session)
        started += await fleet.shared_state(setup)
        gateways = fleet.start_gateways(setup, options=("--prefix-cache-unit", cache_unit))
        started += gateways
        for gateway in setup.registrars(gateways):
            await _register(session, gateway, llamas, calibration)
        await fleet.wait_ready(session, gateways, len(llamas.specs), model)
        t0 = asyncio.get_running_loop().time() + 0.1

        def body_of(turn: ChatTurn, answers: Sequence[str]) -> dict[str, Any]:
            return request_body(model, chats, seed, turn, answers)

        results = await drive_chats(session, schedule, body_of, [g.url for g in gateways], t0)
        idle = await llamas.wait_idle(session)
        counted = await llamas.tokens(session)  # since the restart: this run alone
        summary = summarize_cache_run(
            results,
            warmup_at(schedule, warmup_turns),
            llamas.names(),
            counted,
            gateway=await read_gateways(session, gateways),
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


async def run_engine_scenario(
    fleet: Fleet, specs: tuple[LlamaSpec, ...], args: argparse.Namespace
) -> dict[str, Any]:
    """Start and calibrate the engines, run each set-up ``args.engine_runs`` times; the
    scenario's description and, by set-up key, its runs and their medians."""
    workload = args.engine_workload
    build = prepare(args.engine_model)
    llamas = LlamaFleet(fleet.procs, build)
    setups = engine_setups(args.engine_replicas)
    per_setup: dict[str, list[dict[str, Any]]] = {s.key: [] for s in setups}
    findings: dict[str, list[str]] = {s.key: [] for s in setups}
    out: dict[str, Any] = {
        "model": build.model,
        "engines": [spec.describe() for spec in specs],
        "workload": workload.describe(),
        "replicas": args.engine_replicas,
        "cache_unit": args.engine_cache_unit,
        "setups": [s.key for s in setups],
    }
    try:
        async with client_session() as session:
            await llamas.start(session, specs)
            progress(f"engines: calibrating {len(specs)} llama-servers ({build.model})")
            calibration = await calibrate(session, llamas, workload.chats())
            rate = args.engine_rate or args.engine_load * calibration.cold_capacity_rps
            out["calibration"] = calibration.describe()
            for spec in specs:
                blocks = calibration.cache_blocks(spec, build.model, DEFAULT_BLOCK_BYTES)
                out["calibration"]["engines"][spec.name]["cache_blocks"] = blocks
                out["calibration"]["engines"][spec.name]["speed"] = calibration.speed(spec, specs)
            out.update(
                cold_capacity_rps=calibration.cold_capacity_rps,
                load=rate / calibration.cold_capacity_rps,
                rate_given=bool(args.engine_rate),
                rate_rps=rate,
            )
            progress(
                f"engines: cold capacity {calibration.cold_capacity_rps:.2f} turns/s; offering "
                f"{rate:.2f}/s to {len(setups)} set-ups x {args.engine_runs} runs"
            )
            for run in range(args.engine_runs):
                seed = args.seed + run
                schedule = make_cache_schedule(seed, rate, workload)
                out["span_s"], out["turns"] = schedule[-1].at, len(schedule)
                for setup in rotated(setups, run):
                    t = time.monotonic()
                    summary, found = await run_engine_setup(
                        fleet,
                        llamas,
                        session,
                        setup,
                        schedule,
                        seed,
                        workload,
                        calibration,
                        args.engine_warmup_turns,
                        args.engine_cache_unit,
                    )
                    per_setup[setup.key].append(summary)
                    findings[setup.key] += found
                    progress(
                        f"engines run {run + 1}/{args.engine_runs} {setup.strategy:<21} "
                        f"{setup.mode:<10} hits {summary['hit_rate']:6.1%}  TTFT mean "
                        f"{summary['ttft_mean_ms']:6.0f} ms  latency mean "
                        f"{summary['mean_ms']:6.0f} ms  errors {summary['errors']}  "
                        f"({time.monotonic() - t:.0f} s)"
                    )
    finally:
        llamas.procs.stop(llamas.children.values())
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
        for setup in setups
    }
    return out
