"""The state benchmark's cache_aware mode: the cost of a pick with a prompt's prefix chain,
by prompt length and fleet size, against a real redis-server; and the replica's own cost of
hashing the prompt into its chain.

For each fleet size and prompt length, on an emptied Redis: nodes alike are registered, eight
"system prompts" of the given length are routed once each (the index is warm), then requests
share one of them as their prefix and differ in their last block, so a pick finds a long held
prefix on some node, records every block of the chain on its winner and evicts down to the
capacity: the work of a real fleet, not of an empty index.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import time

import redis.asyncio as aioredis

from gateway.replica.prefix import derive_chain
from scripts.bench.harness import RedisServer, script_stats
from shared_state import Outcome, PrefixSettings, Store, StoreSettings, Strategy

SIZES = (4, 16, 64, 256)
PROMPT_TOKENS = (1_000, 8_000, 32_000, 128_000)
BYTES_PER_TOKEN = 4  # English text; docs/state.md
BLOCK_BYTES = 256
PREFIXES = 8
# (fleet size, prompt tokens) -> figure name -> median
Results = dict[tuple[int, int], dict[str, float]]


def chain(name: str, blocks: int) -> list[str]:
    """A made-up chain of ``blocks`` hashes (the pick only sees hashes)."""
    return [
        hashlib.blake2b(f"{name}:{k}".encode(), digest_size=8).hexdigest() for k in range(blocks)
    ]


def hash_us(tokens: int) -> float:
    """Microseconds the replica spends deriving the chain of a prompt of ``tokens`` tokens
    (the best of several tries: the cost, not the machine's noise)."""
    text = b"lorem ipsum " * (tokens * BYTES_PER_TOKEN // 12)
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        derive_chain("m", text, BLOCK_BYTES)
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


async def one_run(
    url: str, nodes: int, tokens: int, pairs: int, concurrency: int, whole_prompts: bool = False
) -> dict[str, float]:
    """On an emptied Redis with ``nodes`` registered: client and server microseconds per
    cache_aware pick one at a time, and pick+release pairs/s at ``concurrency``; with
    ``whole_prompts``, the index counting whole prompts (``--prefix-cache-unit prompts``)."""
    admin = aioredis.Redis.from_url(url)
    await admin.flushall()
    settings = StoreSettings(prefix=PrefixSettings(whole_prompts=whole_prompts))
    store = Store.open(url, timeout_s=5.0, settings=settings)
    for i in range(nodes):
        # Alike: the cost of a pick in a steady state where each node keeps its prefixes.
        await store.add_node(f"http://10.0.{i // 250}.{i % 250}:8000", ["m"])
    await store.refresh()
    blocks = max(1, tokens * BYTES_PER_TOKEN // BLOCK_BYTES)
    bases = [chain(f"p{k}", blocks) for k in range(PREFIXES)]
    counter = iter(range(1 << 30))

    def request_chain() -> list[str]:
        i = next(counter)
        return [*bases[i % PREFIXES][:-1], f"{i:016x}"]

    async def pair(tag: str) -> None:
        p = await store.pick(
            "m",
            strategy=Strategy.CACHE_AWARE,
            replica="bench",
            request_id=tag,
            blocks=request_chain(),
        )
        assert p is not None
        await store.release(p.lease, Outcome.OK, 0.01)

    for k in range(PREFIXES * 2):  # warm: every prefix held somewhere, scripts loaded
        await pair(f"w{k}")
    serial = max(pairs // 4, 50)
    # One at a time: the client times each pick alone; the server's script time covers the
    # picks and the releases, whose own cost is measured after and taken off.
    await admin.config_resetstat()
    pick_s, matched = 0.0, 0.0
    for i in range(serial):
        t0 = time.perf_counter()
        p = await store.pick(
            "m",
            strategy=Strategy.CACHE_AWARE,
            replica="bench",
            request_id=f"s{i}",
            blocks=request_chain(),
        )
        pick_s += time.perf_counter() - t0
        assert p is not None
        matched += p.prefix_matched / max(1, p.prefix_total)
        await store.release(p.lease, Outcome.OK, 0.01)
    _, pairs_usec = await script_stats(admin)
    held = []
    for i in range(serial):
        p = await store.pick(
            "m", strategy=Strategy.CACHE_AWARE, replica="bench", request_id=f"r{i}"
        )
        assert p is not None
        held.append(p)
    await admin.config_resetstat()
    for p in held:
        await store.release(p.lease, Outcome.OK, 0.01)
    _, release_usec = await script_stats(admin)

    queue = iter(range(pairs))

    async def worker() -> None:
        for i in queue:
            await pair(f"c{i}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rate = pairs / (time.perf_counter() - t0)
    await store.close()
    await admin.aclose()
    return {
        "pairs_per_s": rate,
        "client_us_per_pick": pick_s / serial * 1e6,
        "server_us_per_pick": (pairs_usec - release_usec) / serial,
        "matched_fraction": matched / serial,
    }


async def measure(runs: int, pairs: int, concurrency: int, whole_prompts: bool = False) -> Results:
    """On a throwaway redis-server, ``runs`` runs of every (fleet size, prompt tokens): the
    medians of the :func:`one_run` figures, with the replica's hashing cost."""
    server = RedisServer().start()
    results: Results = {}
    try:
        for nodes in SIZES:
            for tokens in PROMPT_TOKENS:
                figures = [
                    await one_run(server.url, nodes, tokens, pairs, concurrency, whole_prompts)
                    for _ in range(runs)
                ]
                found = {k: statistics.median(r[k] for r in figures) for k in figures[0]}
                found["hash_us"] = hash_us(tokens)
                results[(nodes, tokens)] = found
    finally:
        server.close()
    return results


def print_report(runs: int, concurrency: int, results: Results, unit: str = "blocks") -> None:
    """The table by fleet size and prompt length, then one JSON line."""
    print(
        f"cache_aware pick, {BLOCK_BYTES}-byte blocks ({BYTES_PER_TOKEN} bytes a token), "
        f"{PREFIXES} shared prefixes, caches counted in {unit}, medians of {runs} runs"
    )
    print(
        f"{'nodes':>6} {'tokens':>8} {'blocks':>7} {'pairs/s (c=' + str(concurrency) + ')':>18} "
        f"{'client us/pick':>15} {'server us/pick':>15} {'matched':>8} {'hash us':>8}"
    )
    for (nodes, tokens), r in results.items():
        blocks = tokens * BYTES_PER_TOKEN // BLOCK_BYTES
        print(
            f"{nodes:>6} {tokens:>8,} {blocks:>7} {r['pairs_per_s']:>18,.0f} "
            f"{r['client_us_per_pick']:>15.0f} {r['server_us_per_pick']:>15.0f} "
            f"{r['matched_fraction']:>8.0%} {r['hash_us']:>8.0f}"
        )
    print(
        json.dumps(
            {
                "bench": "state_prefix",
                "cache_unit": unit,
                "runs": runs,
                "concurrency": concurrency,
                "results": {
                    f"{n}x{t}": {k: round(v, 3) for k, v in r.items()}
                    for (n, t), r in results.items()
                },
            }
        )
    )
