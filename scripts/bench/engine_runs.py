"""The routing benchmark's scenario on real engines (``--engines llama``): llama.cpp
``llama-server``s with the bigger random model, whose prefill time depends on their real prefix
caches, a real redis-server, gateway replicas sharing it and a health-checker; multi-turn chats
sharing long system prompts (scripts/bench/chats.py) offered open loop; every strategy
compared on the same arrivals.

Invariants:

- The offered rate is a fraction (``--load``) of the fleet's cold capacity, measured first
  (scripts/bench/calibration.py): every strategy can serve it, however few prefixes it reuses.
  ``--engine-rate`` sets it in turns/s instead (the same load from one invocation to the next
  on a machine whose calibration varies with what else runs on it).
- Every set-up starts on engines restarted empty, an emptied Redis, a new checker and new
  gateways; run r offers every set-up the same turns (seed ``--seed + r``), and the order of the
  set-ups rotates by one each run, so none always runs first on a machine that drifts.
- A set-up is compared with ``round_robin`` run by run: the figure is the median over runs of
  the ratio of the two set-ups' figures in the same run.
- A run is a number of turns, not of seconds (``--engine-requests``, the first
  ``--engine-warmup`` of them sent but not counted): a slower machine calibrates to a lower
  rate and takes longer, but every set-up is judged on as many turns.
- Hit rates come from the engines alone: the usage they answered with (the measured window),
  and their own counters over the whole run (warm-up included), which must add up to the
  usage of every answered turn.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import signal
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from scripts.bench.calibration import DEFAULT_BLOCK_BYTES, Calibration, calibrate
from scripts.bench.chat_load import drive_chats, median_chats, request_body, summarize_chats
from scripts.bench.chats import ChatTurn, ChatWorkload, make_chat_schedule
from scripts.bench.fleet import EXPECTED_LOG, Fleet
from scripts.bench.harness import Child, Interrupted, StartupError, log_findings, progress
from scripts.bench.hits import total
from scripts.bench.llama_nodes import LlamaFleet, kv_bytes_per_token, model_shape, prepare
from scripts.bench.load import client_session
from scripts.bench.routing import machine
from scripts.bench.scenario import Setup
from shared_state import Strategy

BASELINE = "round_robin"
ENGINE_STRATEGIES = (
    "round_robin",
    "least_connections",
    "min_expected_latency",
    "min_observed_latency",
    "session_affinity",
    "min_cache_usage",
    "cache_aware",
)
QUICK_STRATEGIES = ("round_robin", "cache_aware")
RATIO_FIGURES = ("mean_ms", "p90_ms", "ttft_p50_ms")


def engine_setups(replicas: int, quick: bool, only: Sequence[str] = ()) -> list[Setup]:
    """Every strategy this gateway knows on ``replicas`` replicas sharing Redis, and
    ``cache_aware`` also on one (the set-up its shared index must match); ``only`` keeps the
    set-ups whose key holds one of its words, and the baseline."""
    known = {s.value for s in Strategy}
    names = [s for s in (QUICK_STRATEGIES if quick else ENGINE_STRATEGIES) if s in known]
    setups = [Setup(s, replicas, True) for s in names]
    if "cache_aware" in names and replicas > 1 and not quick:
        setups.append(Setup("cache_aware", 1, True))
    if only:
        setups = [s for s in setups if s.strategy == BASELINE or any(w in s.key for w in only)]
    return setups


def recorded_command(argv: Sequence[str]) -> str:
    """The command line the results record: ``argv`` less ``--out`` and its folder (where the
    files went changes no figure, and a folder of this machine belongs in no published page)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return " ".join(["python scripts/bench_routing.py", *kept])


def rotated(setups: Sequence[Setup], run: int) -> list[Setup]:
    """``setups`` starting at position ``run`` (mod their number)."""
    k = run % len(setups) if setups else 0
    return [*setups[k:], *setups[:k]]


def ratios_vs_baseline(comparison: dict[str, Any], baseline: str) -> None:
    """Add ``vs_baseline`` to every row of ``comparison``: for each figure of
    :data:`RATIO_FIGURES`, the median over runs of row / baseline in the same run (by seed)."""
    if baseline not in comparison:
        return
    base = {r["seed"]: r for r in comparison[baseline]["runs"]}
    for row in comparison.values():
        out: dict[str, Any] = {}
        for figure in RATIO_FIGURES:
            ratios = [
                r[figure] / base[r["seed"]][figure]
                for r in row["runs"]
                if r["seed"] in base and base[r["seed"]][figure] and not math.isnan(r[figure])
            ]
            ratios = [x for x in ratios if not math.isnan(x)]
            out[figure] = statistics.median(ratios) if ratios else math.nan
            out[figure + "_runs"] = ratios
        row["vs_baseline"] = out


async def _register(
    session: aiohttp.ClientSession,
    gateway: Child,
    llamas: LlamaFleet,
    calibration: Calibration,
    block_bytes: int,
) -> None:
    for name, spec in llamas.specs.items():
        payload = {
            "url": llamas.url(name),
            "status": {
                "models": [llamas.build.model],
                "speed": calibration.speed(spec, list(llamas.specs.values())),
            },
            "cache_blocks": calibration.cache_blocks(spec, llamas.build.model, block_bytes),
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
    workload: ChatWorkload,
    calibration: Calibration,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[str]]:
    """Restart the engines, start the checker and gateways, drive one schedule, stop them; the
    summary of the measured window with the engines' own counts, and what was logged."""
    started: list[Child] = []
    fleet.check()
    model = llamas.build.model
    try:
        await llamas.restart(session)
        await fleet.reset_redis()
        started.append(fleet.start_checker())
        gateways = fleet.start_gateways(setup)
        started += gateways
        await _register(session, gateways[0], llamas, calibration, DEFAULT_BLOCK_BYTES)
        await fleet.wait_ready(session, gateways, len(llamas.specs), model)
        t0 = asyncio.get_running_loop().time() + 0.1

        def body_of(turn: ChatTurn, answers: Sequence[str]) -> dict[str, Any]:
            return request_body(model, workload, seed, turn, answers)

        results = await drive_chats(session, schedule, body_of, [g.url for g in gateways], t0)
        idle = await llamas.wait_idle(session)
        # The measured window opens at the first turn past the warm-up ones.
        lo = schedule[args.engine_warmup].at if len(schedule) > args.engine_warmup else math.inf
        summary = summarize_chats(results, lo, math.inf, llamas.names())
        counted = await llamas.tokens(session)
        answered = total(r.tokens for r in results if r.ok)
        engines = total(counted.values())
        summary.update(
            seed=seed,
            engine_hit_rate=engines.hit_rate,
            engine_prompt_tokens=engines.prompt,
            engine_cached_tokens=engines.cached,
            usage_prompt_tokens_whole_run=answered.prompt,
            usage_cached_tokens_whole_run=answered.cached,
            engine_tokens={n: [t.prompt, t.cached] for n, t in counted.items()},
            engines_idle_after=idle,
        )
        dead = [c.name for c in started if not c.alive()]
        if dead:
            summary["died"] = dead
    finally:
        fleet.procs.stop(started)
    return summary, log_findings(started, EXPECTED_LOG)


async def measure_engines(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Calibrate, then run every set-up ``--runs`` times; the whole result. A SIGINT or SIGTERM
    raises :class:`Interrupted` once all is stopped."""
    started_at = time.monotonic()
    workload = ChatWorkload(
        args.chat_prompts,
        args.chat_prompt_words,
        args.chat_turns,
        args.chat_user_words,
        args.chat_answer_tokens,
        args.chat_conversations,
        args.chat_gap,
        args.stream_fraction,
    )
    setups = engine_setups(args.engine_replicas, args.quick, args.only)
    build = prepare(args.engine_model)
    fleet = Fleet(log_dir)
    llamas = LlamaFleet(fleet.procs, build)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal() -> None:
        fleet.interrupted = True
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    result: dict[str, Any] = {
        "bench": "routing-engines",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": recorded_command(sys.argv[1:]),
        "machine": machine(),
        "runs": args.runs,
        "requests": args.engine_requests,
        "warmup_requests": args.engine_warmup,
        "seed": args.seed,
        "model": build.model,
        "model_shape": model_shape(build.model),
        "kv_bytes_per_token": kv_bytes_per_token(build.model),
        "engines": [spec.describe() for spec in args.llamas],
        "workload": workload.describe(),
        "baseline": BASELINE,
        "engine_replicas": args.engine_replicas,
    }
    per_setup: dict[str, list[dict[str, Any]]] = {s.key: [] for s in setups}
    findings: dict[str, list[str]] = {s.key: [] for s in setups}
    try:
        fleet.start_redis()
        async with client_session() as session:
            await llamas.start(session, args.llamas)
            progress(f"calibrating {len(llamas.specs)} engines ({build.model})")
            calibration = await calibrate(session, llamas, workload)
            rate = args.engine_rate or args.load * calibration.cold_capacity_rps
            result["calibration"] = calibration.describe()
            result["rate_rps"] = rate
            result["rate_given"] = bool(args.engine_rate)
            result["load"] = rate / calibration.cold_capacity_rps
            for spec in args.llamas:
                blocks = calibration.cache_blocks(spec, build.model, DEFAULT_BLOCK_BYTES)
                result["calibration"]["engines"][spec.name]["cache_blocks"] = blocks
                result["calibration"]["engines"][spec.name]["speed"] = calibration.speed(
                    spec, args.llamas
                )
            progress(
                f"cold capacity {calibration.cold_capacity_rps:.2f} turns/s; offering "
                f"{rate:.2f}/s ({result['load']:.0%}) to {len(setups)} set-ups x {args.runs} runs"
            )
            span = args.engine_requests / rate  # so the schedule has exactly that many turns
            result["span_s"] = span
            for run in range(args.runs):
                seed = args.seed + run
                schedule = make_chat_schedule(seed, rate, span, workload)
                for setup in rotated(setups, run):
                    t = time.monotonic()
                    summary, found = await run_engine_setup(
                        fleet, llamas, session, setup, schedule, seed, workload, calibration, args
                    )
                    # The 1-minute load average as the run ends: what else ran meanwhile (the
                    # engines alone make about one per busy engine).
                    summary["loadavg_1m"] = os.getloadavg()[0]
                    per_setup[setup.key].append(summary)
                    host = socket.gethostname()
                    findings[setup.key] += [line.replace(host, "<host>") for line in found]
                    progress(
                        f"run {run + 1}/{args.runs} {setup.strategy:<21} {setup.mode:<10} "
                        f"mean {summary['mean_ms']:7.1f} ms  TTFT p50 "
                        f"{summary['ttft_p50_ms']:7.1f} ms  hits {summary['hit_rate']:.0%}  "
                        f"errors {summary['errors']}  ({time.monotonic() - t:.1f} s)"
                    )
    except Exception:
        if fleet.interrupted:  # the children got the signal too: what failed next is no news
            raise Interrupted from None
        raise
    finally:
        await fleet.close()
    if fleet.interrupted:
        raise Interrupted
    comparison: dict[str, Any] = {}
    for setup in setups:
        runs = per_setup[setup.key]
        comparison[setup.key] = {
            "strategy": setup.strategy,
            "mode": setup.mode,
            "replicas": setup.replicas,
            "median": {
                **median_chats(runs),
                "engine_hit_rate": statistics.median(r["engine_hit_rate"] for r in runs),
            },
            "runs": runs,
            "log_findings": findings[setup.key][:20],
            "log_findings_count": len(findings[setup.key]),
        }
    ratios_vs_baseline(comparison, Setup(BASELINE, args.engine_replicas, True).key)
    result["comparison"] = comparison
    result["elapsed_s"] = time.monotonic() - started_at
    return result
