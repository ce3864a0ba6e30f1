"""Cost of pick-and-reserve + release against a real redis-server, by fleet size.

Starts its own redis-server on a free loopback port, registers N nodes, and measures for
N = 4, 16, 64, 256: pick+release pairs per second at a set concurrency, microseconds per
script call seen by the client one at a time, and the server's own microseconds per call
(INFO commandstats). Prints a table and one JSON line; medians over ``--runs`` runs.

    python scripts/bench_state.py [--runs 5] [--pairs 2000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import redis.asyncio as aioredis

from scripts.bench.harness import RedisServer, script_stats
from shared_state import Outcome, Store, Strategy

SIZES = (4, 16, 64, 256)


async def server_usec_per_call(client: aioredis.Redis) -> float:
    calls, usec = await script_stats(client)
    return usec / calls if calls else 0.0


async def one_run(
    url: str, nodes: int, strategy: Strategy, pairs: int, concurrency: int
) -> dict[str, float]:
    admin = aioredis.Redis.from_url(url)
    await admin.flushall()
    store = Store.open(url, timeout_s=5.0)
    for i in range(nodes):
        await store.add_node(f"http://10.0.{i // 250}.{i % 250}:8000", ["m"], speed=1 + i % 3)
    await store.refresh()

    async def pair(tag: str) -> None:
        p = await store.pick("m", strategy=strategy, replica="bench", request_id=tag)
        assert p is not None
        await store.release(p.lease, Outcome.OK, 0.01)

    for i in range(200):  # warm up: connections, script cache
        await pair(f"w{i}")
    await admin.config_resetstat()

    serial = max(pairs // 4, 200)
    t0 = time.perf_counter()
    for i in range(serial):
        await pair(f"s{i}")
    serial_us = (time.perf_counter() - t0) / (2 * serial) * 1e6
    server_us = await server_usec_per_call(admin)

    queue = iter(range(pairs))

    async def worker() -> None:
        for i in queue:
            await pair(f"c{i}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rate = pairs / (time.perf_counter() - t0)
    await store.close()
    await admin.aclose()
    return {"pairs_per_s": rate, "client_us_per_call": serial_us, "server_us_per_call": server_us}


async def main_async(args: argparse.Namespace) -> int:
    server = RedisServer().start()
    results: dict[int, dict[str, float]] = {}
    try:
        for nodes in SIZES:
            runs = [
                await one_run(server.url, nodes, args.strategy, args.pairs, args.concurrency)
                for _ in range(args.runs)
            ]
            results[nodes] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    finally:
        server.close()

    print(f"pick+release, strategy {args.strategy.value}, medians of {args.runs} runs")
    print(
        f"{'nodes':>6} {'pairs/s (c=' + str(args.concurrency) + ')':>18} "
        f"{'client us/call (c=1)':>21} {'server us/call':>15}"
    )
    for nodes, r in results.items():
        print(
            f"{nodes:>6} {r['pairs_per_s']:>18,.0f} {r['client_us_per_call']:>21.1f} "
            f"{r['server_us_per_call']:>15.1f}"
        )
    ratio_client = results[256]["client_us_per_call"] / results[16]["client_us_per_call"]
    ratio_server = results[256]["server_us_per_call"] / results[16]["server_us_per_call"]
    verdict = "holds" if max(ratio_client, ratio_server) <= 2.0 else "MISSED"
    print(
        f"cost at 256 nodes / cost at 16: client {ratio_client:.2f}x, server "
        f"{ratio_server:.2f}x (target <= 2x: {verdict})"
    )
    print(
        json.dumps(
            {
                "bench": "state",
                "strategy": args.strategy.value,
                "runs": args.runs,
                "concurrency": args.concurrency,
                "results": {
                    str(k): {m: round(v, 2) for m, v in r.items()} for k, r in results.items()
                },
                "ratio_256_vs_16": {
                    "client": round(ratio_client, 3),
                    "server": round(ratio_server, 3),
                },
                "target_holds": verdict == "holds",
            }
        )
    )
    return 0 if verdict == "holds" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--strategy", type=Strategy, default=Strategy.MIN_EXPECTED_LATENCY)
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
