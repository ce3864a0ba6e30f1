"""The routing benchmark's second part: what a request costs the gateway and Redis as the
fleet grows to 256 registered nodes, all served by one instant simulated node."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import time
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from gateway.sim.node import NODE_KEY, SimConfig, build_app
from scripts.bench.figures import quantile
from scripts.bench.fleet import Fleet
from scripts.bench.harness import (
    ROOT,
    START_TIMEOUT_S,
    StartupError,
    proc_cpu_s,
    progress,
    script_stats,
)
from scripts.bench.load import MODEL, client_session, drive, uniform_choice
from scripts.bench.scenario import Lengths, Setup, make_schedule
from shared_state import Store

SCALE_SIZES = (4, 16, 64, 256)
FULL_SCAN_LIMIT = 32  # shared_state.store.StoreSettings.full_scan_limit


def serve_instant_nodes(count: int) -> int:
    """One instant simulated node listening on ``count`` loopback ports (distinct node URLs);
    prints ``{"ports": [...]}`` once they listen, serves until SIGINT or SIGTERM."""

    async def main() -> None:
        app = build_app(SimConfig(models=(MODEL,), slots=1 << 16, tokens_per_s=0.0))
        app[NODE_KEY].name = "instant"
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for _ in range(count):
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        ports = [addr[1] for addr in runner.addresses]
        print(json.dumps({"ports": ports}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


async def _redis_counters(r: aioredis.Redis) -> dict[str, float]:
    """Redis CPU seconds, and script calls and their time."""
    cpu = await r.info("cpu")
    calls, usec = await script_stats(r)
    return {
        "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        "script_calls": calls,
        "script_usec": usec,
    }


async def scale(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    """One replica on Redis with each fleet size at ``--scale-rate``: by size, the runs' and
    the median CPU per request of the gateway and Redis, and Redis script calls."""
    sizes = (4, 64) if args.quick else SCALE_SIZES
    here = str(ROOT / "scripts" / "bench_routing.py")
    helper = fleet.procs.start(
        "instant-nodes", [fleet.py, here, "--serve-instant-nodes", str(max(sizes))]
    )
    ports: list[int] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ports:
        for line in helper.text().splitlines():
            if line.startswith('{"ports"'):
                ports = json.loads(line)["ports"]
        if not ports:
            if time.monotonic() > deadline or not helper.alive():
                raise StartupError(f"instant nodes did not start:\n{helper.tail()}")
            await asyncio.sleep(0.05)

    out: dict[str, Any] = {"sizes": {}, "rate_rps": args.scale_rate}
    setup = Setup("min_expected_latency", 1, True)
    async with client_session() as session:
        for size in sizes:
            fleet.check()
            await fleet.reset_redis()
            store = Store.open(fleet.redis_url, timeout_s=5.0)
            try:
                for i, port in enumerate(ports[:size]):
                    url = f"http://127.0.0.1:{port}"
                    await store.add_node(url, [MODEL], speed=float(1 + i % 3))
            finally:
                await store.close()
            gateways = fleet.start_gateways(setup, tag=f"-scale{size}")
            gw = gateways[0]
            runs: list[dict[str, float]] = []
            try:
                await fleet.wait_ready(session, gateways, size)
                choose = uniform_choice([gw.url])
                loop = asyncio.get_running_loop()
                lengths = Lengths(16, 1e-9, 16)  # always 16 tokens, instant
                warm = make_schedule(args.seed, args.scale_rate, 1.0, lengths, 0.0)
                await drive(session, warm, choose, loop.time() + 0.05)
                for run in range(args.runs):
                    fleet.check()
                    schedule = make_schedule(
                        args.seed + run, args.scale_rate, args.scale_duration, lengths, 0.0
                    )
                    cpu0, red0 = proc_cpu_s(gw.proc.pid), await _redis_counters(fleet.r)
                    results = await drive(session, schedule, choose, loop.time() + 0.05)
                    cpu1, red1 = proc_cpu_s(gw.proc.pid), await _redis_counters(fleet.r)
                    served = sum(1 for r in results if r.ok)
                    n = max(served, 1)
                    calls = red1["script_calls"] - red0["script_calls"]
                    runs.append(
                        {
                            "requests": len(results),
                            "served": served,
                            "gateway_cpu_ms_per_req": (cpu1 - cpu0) * 1000 / n,
                            "redis_cpu_us_per_req": (red1["cpu_s"] - red0["cpu_s"]) * 1e6 / n,
                            "script_calls_per_req": calls / n,
                            "script_us_per_call": (red1["script_usec"] - red0["script_usec"])
                            / max(calls, 1),
                            "p50_ms": quantile([r.latency * 1000 for r in results if r.ok], 0.5),
                        }
                    )
                    progress(
                        f"scale {size:>3} nodes run {run + 1}/{args.runs}: gateway "
                        f"{runs[-1]['gateway_cpu_ms_per_req']:.3f} ms CPU/req, redis "
                        f"{runs[-1]['redis_cpu_us_per_req']:.1f} us CPU/req, "
                        f"{served}/{len(results)} served"
                    )
            finally:
                fleet.procs.stop(gateways)
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            out["sizes"][str(size)] = {"median": med, "runs": runs}
    fleet.procs.stop([helper])
    return out
