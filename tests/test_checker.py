"""The health-checker: its shared state on both stores, its rounds against real simulated
nodes and a real gateway, and leader fail-over between two checker processes."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.checker.health_checker import CheckerSettings, HealthChecker
from shared_state import Fenced, HealthLedger, NodeState, ProbeResult, Store, StoreSettings
from tests.conftest import StoreFactory
from tests.fleet import Gateway, Process, SimNode, eventually
from tests.support import free_port, wait_for_port

MODEL = "sim-model"
A, B = "http://127.0.0.1:9301", "http://127.0.0.1:9302"
OK, FAIL, NONE = ProbeResult.OK, ProbeResult.FAIL, ProbeResult.NONE


async def report(ledger: HealthLedger, token: int, node: str, result: ProbeResult, **kw: object):
    options: dict[str, object] = {"fall": 3, "rise": 2, "deregister_after_ms": 0}
    options.update(kw)
    return await ledger.report(token, node, result, **options)  # type: ignore[arg-type]


class TestLedger:
    async def test_one_leader_and_takeover_fences_the_old_one(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        one, two = HealthLedger(store, "one"), HealthLedger(store, "two")
        token1, holder = await one.lead(300)
        assert token1 > 0 and holder == "one"
        assert await two.lead(300) == (0, "one")
        assert (await one.lead(300))[0] == token1  # keeping the lease keeps the token
        await asyncio.sleep(0.45)  # "one" paused past its lease
        token2, holder = await two.lead(300)
        assert token2 > token1 and holder == "two"
        before = await store.get_node(A)
        for _ in range(5):
            with pytest.raises(Fenced):
                await report(one, token1, A, FAIL, fall=1)
        with pytest.raises(Fenced):
            await one.sweep(token1, [A], 1000)
        assert await store.get_node(A) == before
        assert (await report(two, token2, A, OK)).status == "ok"
        await two.resign()
        token3, _ = await one.lead(300)
        assert token3 > token2

    async def test_fall_and_rise_with_reasons_and_events(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        ledger = HealthLedger(store, "c")
        token, _ = await ledger.lead(10_000)
        epoch = await store.epoch()
        for result in (FAIL, FAIL, OK, FAIL, FAIL):  # never 3 failures in a row
            assert not (await report(ledger, token, A, result, reason="GET /health 503")).changed
        assert (await store.get_node(A)).state is NodeState.ACTIVE
        assert await store.epoch() == epoch
        moved = await report(ledger, token, A, FAIL, reason="GET /health 503")
        assert moved.changed and moved.state == "unhealthy"
        node = await store.get_node(A)
        assert node.state is NodeState.UNHEALTHY and node.state_reason == "GET /health 503"
        assert await store.epoch() == epoch + 1
        for result in (OK, FAIL, OK):  # rise needs 2 in a row
            assert (await report(ledger, token, A, result)).state == "unhealthy"
        assert (await report(ledger, token, A, OK)).state == "active"
        events = await ledger.events()
        assert [(e.from_state, e.to_state) for e in events] == [
            ("unhealthy", "active"),
            ("active", "unhealthy"),
        ]
        assert events[1].reason == "GET /health 503" and events[0].by == "c"

    async def test_draining_is_left_to_operators(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        await store.drain(A)
        ledger = HealthLedger(store, "c")
        token, _ = await ledger.lead(10_000)
        for _ in range(5):
            await report(ledger, token, A, FAIL, fall=1)
        assert (await store.get_node(A)).state is NodeState.DRAINING

    async def test_deregistered_after_deadline_with_leases_and_history(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        await store.add_node(B, ["m"])
        p = await store.pick("m", strategy="random", replica="r", request_id="1", exclude=[B])
        assert p is not None
        ledger = HealthLedger(store, "c")
        token, _ = await ledger.lead(10_000)
        assert (await report(ledger, token, A, FAIL, fall=1, deregister_after_ms=300)).changed
        assert (await report(ledger, token, A, FAIL, deregister_after_ms=300)).status == "ok"
        await asyncio.sleep(0.35)
        gone = await report(ledger, token, A, FAIL, deregister_after_ms=300)
        assert gone.status == "removed"
        assert [n.id for n in (await store.registry()).nodes] == [B]
        assert await store.in_flight(A) == 0
        assert await store.client.exists(store.keys.latencies(A), store.keys.node(A)) == 0
        assert (await report(ledger, token, A, OK)).status == "gone"
        # A node that comes back can simply register again.
        _, created = await store.add_node(A, ["m"])
        assert created

    async def test_models_and_load_are_recorded(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        ledger = HealthLedger(store, "c")
        token, _ = await ledger.lead(10_000)
        epoch = await store.epoch()
        await report(ledger, token, A, OK, models=["m", "m2"], kv_usage=0.4, running=3, waiting=1)
        node = await store.get_node(A)
        assert node.models == ("m", "m2") and await store.epoch() == epoch + 1
        assert node.kv_usage == 0.4 and node.kv_running == 3 and node.kv_waiting == 1
        assert node.kv_ts_ms and node.last_probe_ms

    async def test_sweep_prunes_expired_leases_and_lists_live_replicas(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory(StoreSettings(lease_ms=200))
        await store.add_node(A, ["m"])
        held = []
        for i in range(3):
            p = await store.pick("m", strategy="random", replica="gw1", request_id=str(i))
            assert p is not None
            held.append(p.lease)
        assert await store.renew("gw1", held) == 3
        await asyncio.sleep(0.3)
        ledger = HealthLedger(store, "c")
        token, _ = await ledger.lead(10_000)
        sweep = await ledger.sweep(token, [A], 60_000)
        assert sweep.pruned_leases == 3 and list(sweep.live_replicas) == ["gw1"]
        assert await store.client.zcard(store.keys.leases(A)) == 0
        assert (await ledger.sweep(token, [A], 100)).live_replicas == {}


@pytest.fixture
async def real_store(redis_url: str) -> AsyncIterator[Store]:
    store = Store.open(redis_url)
    yield store
    await store.close()


def checker_for(store: Store, **kw: object) -> HealthChecker:
    options: dict[str, object] = {
        "redis_url": "x",
        "interval": 0.2,
        "timeout": 1.0,
        "fall": 2,
        "rise": 2,
        "deregister_after": 0.0,
        "checker_id": "t",
    }
    options.update(kw)
    return HealthChecker(CheckerSettings(**options), store)  # type: ignore[arg-type]


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
            return busy.stats()["running"] == 3

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


def test_load_parsing_reads_vllm_sglang_and_lmdeploy_names() -> None:
    from gateway.checker.probes import parse_load

    vllm = (
        "# HELP vllm:kv_cache_usage_perc KV-cache usage.\n"
        'vllm:kv_cache_usage_perc{model_name="a"} 0.25\n'
        'vllm:kv_cache_usage_perc{model_name="b"} 0.5\n'
        'vllm:num_requests_running{model_name="a"} 3.0\n'
        'vllm:num_requests_running{model_name="b"} 1.0\n'
        'vllm:num_requests_waiting{model_name="a"} 2.0\n'
    )
    load = parse_load(vllm)
    assert load is not None and (load.kv_usage, load.running, load.waiting) == (0.5, 4, 2)
    sglang = (
        'sglang:token_usage{model_name="x"} 0.7\n'
        "sglang:num_running_reqs 5\n"
        "sglang:num_queue_reqs 9\n"
    )
    load = parse_load(sglang)
    assert load is not None and (load.kv_usage, load.running, load.waiting) == (0.7, 5, 9)
    percent = "lmdeploy:gpu_cache_usage_perc 42\n"  # published as a percentage
    load = parse_load(percent)
    assert load is not None and load.kv_usage == pytest.approx(0.42)
    assert parse_load("process_cpu_seconds_total 3\n# nothing else\n") is None
    assert parse_load("vllm:kv_cache_usage_perc NaN\n") is None


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
    gateways = [Gateway("--redis-url", redis_url) for _ in range(2)]
    procs += gateways

    async def both_alive() -> bool:
        async with httpx.AsyncClient() as http:
            answer = (await http.get(f"{gateways[0].url}/nodes/replicas")).json()
        return bool(answer["count"] == 2)

    assert await eventually(both_alive, 5)
    async with httpx.AsyncClient() as http:
        status = await http.get(f"{gateways[1].url}/nodes/status")
    assert status.headers["x-fleetgate-live-replicas"] == "2"
