"""The health-checker process survives what it reads and what its store does: node hashes
written straight into Redis that its HTTP client refuses, and a Redis out of memory during its
rounds. After each it is alive, leads, and still marks a genuinely dead node unhealthy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from shared_state import NodeState, Store
from tests.support import MODEL
from tests.support.harness import RedisServer
from tests.support.polling import eventually
from tests.support.processes import Checker, Process, SimNode

# Ids an ops script may write without the registry's validation: each must stay the
# problem of its own node.
FULL_WIDTH = "http://\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com"  # "example" in full width
POISON: dict[str, dict[str, str]] = {
    FULL_WIDTH: {},  # full-width host: httpx raises InvalidURL
    "http://127.0.0.1:1": {"api_key": "clé\r\nX-Injected: 1"},  # a key no header can carry
    "ftp://127.0.0.1:2": {"role": "9", "weight": "", "state": "bogus"},
    "http://[::1": {},  # not even a URL
}


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    store = Store.open(redis_url)
    yield store
    await store.close()


async def write_raw_node(store: Store, node_id: str, extra: dict[str, str]) -> None:
    """A node hash as a script writes it: straight HSET and SADD, no validation."""
    fields = {"id": node_id, "url": node_id, "models": f"\n{MODEL}\n", "state": "active"}
    for name, value in {**fields, **extra}.items():
        await store.client.hset(store.keys.node(node_id), name, value)
    await store.client.sadd(store.keys.nodes, node_id)
    await store.client.incr(store.keys.epoch)


async def wait_state(store: Store, url: str, state: NodeState, timeout_s: float) -> bool:
    async def reached() -> bool:
        return (await store.get_node(url)).state is state

    return await eventually(reached, timeout_s)


def assert_no_traceback(proc: Process) -> None:
    assert proc.alive(), proc.output()
    assert "Traceback" not in proc.output(), proc.output()


async def test_poison_node_hashes_stay_their_nodes_problem(
    redis_url: str, store: Store, procs: list[Process]
) -> None:
    alive, dead = SimNode("--tokens-per-s", "inf"), SimNode("--tokens-per-s", "inf")
    procs += [alive, dead]
    await store.add_node(alive.url, [MODEL])
    await store.add_node(dead.url, [MODEL])
    for node_id, extra in POISON.items():
        await write_raw_node(store, node_id, extra)
    checker = Checker(redis_url, "solo", "--fall", "2", "--timeout", "0.5")
    procs.append(checker)
    assert await eventually(lambda: asyncio.to_thread(checker.leads), 10), checker.output()

    async def poison_unhealthy() -> bool:
        registry = await store.registry()
        states = {n.id: n for n in registry.nodes}
        return all(states[i].state is NodeState.UNHEALTHY for i in POISON)

    assert await eventually(poison_unhealthy, 10), checker.output()
    full_width = next(n for n in (await store.registry()).nodes if n.id == FULL_WIDTH)
    assert "InvalidURL" in full_width.state_reason
    dead.kill()
    assert await wait_state(store, dead.url, NodeState.UNHEALTHY, 10), checker.output()
    assert (await store.get_node(alive.url)).state is NodeState.ACTIVE
    assert checker.leads()
    assert checker.metric("fleetgate_checker_rounds_total") >= 3
    # The node in state "bogus" reads as unhealthy already: no transition.
    assert checker.metric("fleetgate_checker_transitions_total") >= len(POISON)
    assert_no_traceback(checker)
    # Logged once per node and finding, not once per round.
    assert checker.output().count(FULL_WIDTH) <= 2, checker.output()


async def test_node_hashes_that_do_not_decode_do_not_stop_the_rounds(
    redis_url: str, store: Store, procs: list[Process]
) -> None:
    dead = SimNode("--tokens-per-s", "inf")
    procs.append(dead)
    await store.add_node(dead.url, [MODEL])
    # Numbers that are not numbers, and a hash without its id: the registry is read whole,
    # so one such node must not hide every other one from the checker.
    await write_raw_node(store, "http://127.0.0.1:3", {"kv_running": "many", "speed": "fast"})
    await store.client.hset(store.keys.node("http://127.0.0.1:4"), "url", "http://127.0.0.1:4")
    await store.client.sadd(store.keys.nodes, "http://127.0.0.1:4")
    checker = Checker(redis_url, "solo", "--fall", "2", "--timeout", "0.5")
    procs.append(checker)
    assert await eventually(lambda: asyncio.to_thread(checker.leads), 10), checker.output()
    dead.kill()
    assert await wait_state(store, dead.url, NodeState.UNHEALTHY, 10), checker.output()
    assert await wait_state(store, "http://127.0.0.1:3", NodeState.UNHEALTHY, 10)
    assert checker.leads()
    assert_no_traceback(checker)


async def fill_until_oom(client: aioredis.Redis) -> int:
    """Cap Redis just above what it holds, without eviction, fill it until it refuses a
    write, then cap it below what it holds so that it keeps refusing; returns keys added."""
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", str(used + (2 << 20)))
    for filled in range(10_000):
        try:
            await client.set(f"filler:{filled}", b"x" * 1024)
        except aioredis.ResponseError as exc:
            assert "maxmemory" in str(exc)
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory", str(used - (1 << 20)))
            return filled
    raise AssertionError("Redis never refused a write")


async def test_redis_out_of_memory_during_rounds_does_not_end_the_checker(
    procs: list[Process],
) -> None:
    server = RedisServer().start()  # its own: this test changes the server's memory limit
    store = Store.open(server.url)
    raw = aioredis.Redis.from_url(server.url)
    try:
        alive, dead = SimNode("--tokens-per-s", "inf"), SimNode("--tokens-per-s", "inf")
        procs += [alive, dead]
        await store.add_node(alive.url, [MODEL])
        await store.add_node(dead.url, [MODEL])
        checker = Checker(server.url, "solo", "--fall", "2", "--timeout", "0.5")
        procs.append(checker)
        assert await eventually(lambda: asyncio.to_thread(checker.leads), 10), checker.output()
        filled = await fill_until_oom(raw)
        assert filled > 0

        async def store_failures_counted() -> bool:
            errors = await asyncio.to_thread(checker.metric, "fleetgate_checker_store_errors_total")
            return errors >= 5

        # Rounds and lease renewals fail for longer than the lease (1 s): it must ride it out.
        assert await eventually(store_failures_counted, 10), checker.output()
        await asyncio.sleep(1.5)
        assert checker.alive(), checker.output()
        dead.kill()
        await raw.config_set("maxmemory", "0")
        await raw.delete(*(f"filler:{i}" for i in range(filled)))
        assert await eventually(lambda: asyncio.to_thread(checker.leads), 10), checker.output()
        assert await wait_state(store, dead.url, NodeState.UNHEALTHY, 10), checker.output()
        assert (await store.get_node(alive.url)).state is NodeState.ACTIVE
        assert_no_traceback(checker)
        output = checker.output()
        # One warning per kind of failure and operation, not one per round.
        assert output.count("store failed the checker's") <= 4, output
        assert "works again" in output
    finally:
        await raw.aclose()
        await store.close()
        server.close()
