"""The health-checker's rounds against real simulated nodes and a real gateway sharing Redis,
and leader fail-over between two checker processes (its shared state alone, the ledger:
tests/unit/test_health.py; its reading of metrics pages: tests/unit/test_probes.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.checker.health_checker import CheckerSettings, HealthChecker
from shared_state import NodeState, Store
from tests.support import MODEL
from tests.support.harness import free_port, wait_for_port
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, together


@pytest.fixture
async def real_store(redis_url: str) -> AsyncIterator[Store]:
    store = Store.open(redis_url)
    yield store
    await store.close()


# The checker these tests run in-process: fast rounds, two strikes either way, at once gone.
SETTINGS = CheckerSettings(
    redis_url="x",
    interval=0.2,
    timeout=1.0,
    fall=2,
    rise=2,
    deregister_after=0.0,
    checker_id="t",
)


def checker_for(
    store: Store,
    *,
    timeout: float = SETTINGS.timeout,
    fall: int = SETTINGS.fall,
    rise: int = SETTINGS.rise,
    deregister_after: float = SETTINGS.deregister_after,
    probes: frozenset[str] = SETTINGS.probes,
    generate_every: float = SETTINGS.generate_every,
) -> HealthChecker:
    """A checker on ``store`` with :data:`SETTINGS`, changed where the test says."""
    settings = dataclasses.replace(
        SETTINGS,
        timeout=timeout,
        fall=fall,
        rise=rise,
        deregister_after=deregister_after,
        probes=probes,
        generate_every=generate_every,
    )
    return HealthChecker(settings, store)


async def lead(checker: HealthChecker) -> None:
    checker.token, _ = await checker.ledger.lead(60_000)
    assert checker.token


async def nodes_served(gateway: Gateway, n: int) -> set[str]:
    seen = set()
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(n):
            r = await http.post(
                f"{gateway.url}/v1/chat/completions",
                json={"model": MODEL, "messages": [], "max_tokens": 1},
            )
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-fleetgate-node"])
    return seen


async def test_killed_node_unhealthy_after_fall_unrouted_then_deregistered(
    redis_url: str, real_store: Store, procs: list[Process]
) -> None:
    a, b = SimNode("--tokens-per-s", "inf"), SimNode("--tokens-per-s", "inf")
    procs += [a, b]
    gateway = Gateway("--redis-url", redis_url, "--node", a.url, "--node", b.url)
    procs.append(gateway)
    gateway.wait_models(MODEL)
    assert await nodes_served(gateway, 10) == {a.url, b.url}
    checker = checker_for(real_store, fall=2, deregister_after=0.5, timeout=0.5)
    await lead(checker)
    await checker.probe_round()
    a.kill()
    await checker.probe_round()
    assert (await real_store.get_node(a.url)).state is NodeState.ACTIVE  # one failure < fall
    await checker.probe_round()
    assert (await real_store.get_node(a.url)).state is NodeState.UNHEALTHY
    # Every replica stops routing to it at once: the state is read inside the pick script.
    assert await nodes_served(gateway, 10) == {b.url}
    await asyncio.sleep(0.6)
    await checker.probe_round()
    async with httpx.AsyncClient() as http:
        status = (await http.get(f"{gateway.url}/nodes/status")).json()
    assert list(status) == [b.url]
    assert checker.metrics.deregistrations.values[()] == 1
    assert "fleetgate_checker_deregistrations_total 1" in checker.metrics.render().decode()
    await checker.prober.close()


async def test_flapping_node_respects_fall_and_rise(
    real_store: Store, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    await real_store.add_node(node.url, [MODEL])
    checker = checker_for(real_store, fall=3, rise=2, probes=frozenset({"health"}))
    await lead(checker)

    async def round_with(healthy: bool) -> NodeState:
        node.fault("none" if healthy else "unhealthy")
        await checker.probe_round()
        return (await real_store.get_node(node.url)).state

    states = [await round_with(h) for h in (False, False, True, False, False, True)]
    assert set(states) == {NodeState.ACTIVE}  # never 3 failures in a row
    states = [await round_with(h) for h in (False, False, False)]
    assert states[-1] is NodeState.UNHEALTHY
    states = [await round_with(h) for h in (True, False, True, True)]
    assert states == [NodeState.UNHEALTHY] * 3 + [NodeState.ACTIVE]
    await checker.prober.close()


async def test_generation_probe_catches_a_node_whose_health_is_green(
    redis_url: str, real_store: Store, procs: list[Process]
) -> None:
    sick, good = SimNode("--tokens-per-s", "inf"), SimNode("--tokens-per-s", "inf")
    procs += [sick, good]
    gateway = Gateway(
        "--redis-url",
        redis_url,
        "--node",
        sick.url,
        "--node",
        good.url,
        "--strategy",
        "round_robin",
    )
    procs.append(gateway)
    gateway.wait_models(MODEL)
    checker = checker_for(real_store, fall=2, generate_every=0.0)
    await lead(checker)
    await checker.probe_round()  # baseline: health green, no generation probe scheduled
    sick.fault("cannot_generate")
    async with httpx.AsyncClient() as http:
        for _ in range(4):  # gateways see 500s from it (not retried: not a connect failure)
            await http.post(f"{gateway.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert sick.stats()["fault"] == "cannot_generate"
    assert (await real_store.get_node(sick.url)).fail_total > 0
    await checker.probe_round()  # failures reported: generation probe runs at once, fails
    await checker.probe_round()  # still failing generation: second strike
    node = await real_store.get_node(sick.url)
    assert node.state is NodeState.UNHEALTHY and "generation probe" in node.state_reason
    assert await nodes_served(gateway, 6) == {good.url}
    sick.fault("none")
    await checker.probe_round()
    await checker.probe_round()
    assert (await real_store.get_node(sick.url)).state is NodeState.ACTIVE
    await checker.prober.close()


async def test_hung_node_does_not_delay_probes_of_others(
    real_store: Store, procs: list[Process]
) -> None:
    release = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)
        await release.wait()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    hung_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    good = SimNode("--tokens-per-s", "inf")
    procs.append(good)
    await real_store.add_node(hung_url, [MODEL])
    await real_store.add_node(good.url, [MODEL])
    checker = checker_for(real_store, timeout=1.0, fall=1, probes=frozenset({"health"}))
    await lead(checker)
    t0 = time.monotonic()
    await checker.probe_round()
    elapsed = time.monotonic() - t0
    hung = await real_store.get_node(hung_url)
    fine = await real_store.get_node(good.url)
    # The good node's report was written while the hung one was still waiting for its timeout.
    assert fine.last_probe_ms < hung.last_probe_ms
    assert hung.state is NodeState.UNHEALTHY and "timed out" in hung.state_reason
    assert fine.state is NodeState.ACTIVE
    assert elapsed < 10  # bounded by the probe timeout, not by the hung node
    release.set()
    server.close()
    await server.wait_closed()
    await checker.prober.close()


async def test_min_cache_usage_follows_scrapes_and_falls_back_when_stale(
    redis_url: str, real_store: Store, procs: list[Process]
) -> None:
    busy = SimNode("--slots", "4", "--tokens-per-s", "inf")
    idle = SimNode("--slots", "4", "--tokens-per-s", "inf")
    procs += [busy, idle]
    await real_store.add_node(busy.url, [MODEL], speed=100)  # fast on paper
    await real_store.add_node(idle.url, [MODEL], speed=1)
    gateway = Gateway("--redis-url", redis_url, "--strategy", "min_cache_usage")
    procs.append(gateway)
    gateway.wait_models(MODEL)
    checker = checker_for(real_store, probes=frozenset({"health", "metrics"}))
    await lead(checker)
    async with httpx.AsyncClient(timeout=30) as http:
        # Three requests held straight on `busy` fill 3 of its 4 slots (cache use 0.75).
        busy.fault("hang", count=3)
        body = {"model": MODEL, "messages": [], "max_tokens": 2}
        loads = [
            asyncio.ensure_future(http.post(f"{busy.url}/v1/chat/completions", json=body))
            for _ in range(3)
        ]

        async def busy_is_busy() -> bool:
            return int(busy.stats()["running"]) == 3

        assert await eventually(busy_is_busy, 5)
        await checker.probe_round()
        assert (await real_store.get_node(busy.url)).kv_usage == 0.75
        assert await nodes_served(gateway, 8) == {idle.url}
        # Stale scrapes: min_expected_latency decides, and speed 100 beats speed 1.
        client = aioredis.Redis.from_url(redis_url)
        for url in (busy.url, idle.url):
            await client.hset(real_store.keys.node(url), "kv_ts", 1)
        await client.aclose()
        assert await nodes_served(gateway, 8) == {busy.url}
        busy.fault("none")  # releases the held requests: they complete normally
        assert [r.status_code for r in await asyncio.gather(*loads)] == [200, 200, 200]
    await checker.prober.close()


def start_checker(redis_url: str, name: str) -> tuple[Process, int]:
    port = free_port()
    proc = Process(
        [
            sys.executable,
            "-m",
            "gateway.checker.health_checker",
            "--redis-url",
            redis_url,
            "--checker-id",
            name,
            "--interval",
            "0.2",
            "--lease-seconds",
            "1",
            "--metrics-port",
            str(port),
        ],
        f"checker-{name}",
    )
    wait_for_port(port)
    return proc, port


async def test_standby_takes_over_a_paused_leader_and_fences_it(
    redis_url: str, real_store: Store, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    await real_store.add_node(node.url, [MODEL])
    first, first_port = start_checker(redis_url, "first")
    procs.append(first)
    await asyncio.sleep(0.3)
    second, second_port = start_checker(redis_url, "second")
    procs.append(second)

    async def leader_of(port: int) -> bool:
        async with httpx.AsyncClient() as http:
            return bool((await http.get(f"http://127.0.0.1:{port}/health")).json()["leader"])

    async def leader_holder() -> str:
        raw = await real_store.client.get(real_store.keys.leader)
        return str(raw).split(" ")[0] if raw else ""

    async def first_leads() -> bool:
        return await leader_of(first_port)

    assert await eventually(first_leads, 5)
    assert not await leader_of(second_port)
    first.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()

        async def second_leads() -> bool:
            return await leader_of(second_port)

        assert await eventually(second_leads, 5)
        takeover_s = time.monotonic() - t0
        assert await leader_holder() == "second"
    finally:
        first.proc.send_signal(signal.SIGCONT)

    async def first_steps_down() -> bool:
        return not await leader_of(first_port)

    assert await eventually(first_steps_down, 5)
    await asyncio.sleep(0.5)
    assert await leader_holder() == "second" and await leader_of(second_port)
    assert takeover_s < 5


async def test_probes_send_the_nodes_own_key(real_store: Store, procs: list[Process]) -> None:
    keyed = SimNode("--tokens-per-s", "inf", "--api-key", "node-secret")
    procs.append(keyed)
    await real_store.add_node(keyed.url, [MODEL], api_key="node-secret")
    checker = checker_for(real_store, fall=1, generate_every=0.001)
    await lead(checker)
    for _ in range(3):
        await checker.probe_round()
    node = await real_store.get_node(keyed.url)
    assert node.state is NodeState.ACTIVE and node.probe_successes == 3
    assert checker.metrics.probes.values[(("kind", "generate"), ("result", "ok"))] >= 2
    # The same node registered with a wrong key fails the generation probe at once.
    await real_store.update_node(keyed.url, api_key="wrong")
    await checker.probe_round()
    node = await real_store.get_node(keyed.url)
    assert node.state is NodeState.UNHEALTHY and "401" in node.state_reason
    await checker.prober.close()


async def test_gateway_reports_live_replicas(redis_url: str, procs: list[Process]) -> None:
    gateways = together(
        procs, [Gateway("--redis-url", redis_url, listening=False) for _ in range(2)]
    )

    async def both_alive() -> bool:
        async with httpx.AsyncClient() as http:
            answer = (await http.get(f"{gateways[0].url}/nodes/replicas")).json()
        return bool(answer["count"] == 2)

    assert await eventually(both_alive, 5)
    async with httpx.AsyncClient() as http:
        status = await http.get(f"{gateways[1].url}/nodes/status")
    assert status.headers["x-fleetgate-live-replicas"] == "2"
