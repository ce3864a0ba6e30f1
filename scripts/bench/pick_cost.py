"""The state benchmark's measurement: pick-and-reserve + release pairs against a real
redis-server, by fleet size, at a set concurrency and one at a time."""

from __future__ import annotations

import asyncio
import statistics
import time

import redis.asyncio as aioredis

from scripts.bench.harness import RedisServer, script_stats
from shared_state import Outcome, Store, Strategy

SIZES = (4, 16, 64, 256)


async def server_usec_per_call(client: aioredis.Redis) -> float:
    """Microseconds the server spent per script call since its statistics were reset."""
    calls, usec = await script_stats(client)
    return usec / calls if calls else 0.0


async def one_run(
    url: str, nodes: int, strategy: Strategy, pairs: int, concurrency: int
) -> dict[str, float]:
    """On an emptied Redis with ``nodes`` registered: pairs/s at ``concurrency``, and client
    and server microseconds per script call one pair at a time."""
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


async def measure(
    strategy: Strategy, runs: int, pairs: int, concurrency: int
) -> dict[int, dict[str, float]]:
    """On a throwaway redis-server, ``runs`` runs for each of :data:`SIZES`: by size, the
    medians of the :func:`one_run` figures."""
    server = RedisServer().start()
    results: dict[int, dict[str, float]] = {}
    try:
        for nodes in SIZES:
            figures = [
                await one_run(server.url, nodes, strategy, pairs, concurrency) for _ in range(runs)
            ]
            results[nodes] = {k: statistics.median(r[k] for r in figures) for k in figures[0]}
    finally:
        server.close()
    return results
