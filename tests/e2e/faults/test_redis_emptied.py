"""A Redis that lost its data under traffic: ``FLUSHALL``, and a redis-server restarted empty on
the same port (writable, then refusing writes for a while). Two gateway replicas keep their
last registry and one of them writes it back: requests succeed again within a bound, nodes,
their settings, a drain and the client keys come back (a node removed before does not),
nodes added afterwards get traffic, no lease leaks, one replica restores, and ``/ready`` and
the ops CLI say what happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis.asyncio as aioredis

from shared_state import Registry, Store
from shared_state.registry import registry_fields
from tests.support import MODEL
from tests.support.harness import RedisServer
from tests.support.openai_errors import assert_openai_error, assert_openai_error_body
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, ops, together

CLIENT_KEY = "team-a-key-0123456789"
NODE_KEY = "node-2-secret"
WORKERS = 4  # concurrent clients, each alternating over the replicas
MAX_REQUESTS = 20_000  # a bound on the traffic besides its time
RECOVERY_BOUND_S = 10.0


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A redis-server of this test's own: it is emptied, killed and restarted."""
    redis_server = RedisServer().start()
    yield redis_server
    redis_server.close()


async def registry_of(url: str) -> Registry:
    store = Store.open(url)
    try:
        return await store.registry()
    finally:
        await store.close()


def metric(text: str, name: str) -> float:
    """The sum of every sample of metric ``name`` (any labels) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Outcome:
    started: float  # monotonic
    ended: float
    replica: int
    status: int  # 200, or the error status (0: no answer)
    node: str = ""
    route: str = ""


@dataclass
class Traffic:
    """Chat requests from a few workers with the openai SDK, alternating over the replicas
    without pause until stopped, each outcome logged."""

    replicas: list[Gateway]
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, offset: int) -> None:
        clients = [
            openai.AsyncOpenAI(
                base_url=f"{g.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10
            )
            for g in self.replicas
        ]
        turn = offset
        while not self.stop.is_set() and len(self.outcomes) < MAX_REQUESTS:
            index = turn % len(clients)
            turn += 1
            started = time.monotonic()
            try:
                raw = await clients[index].chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
                )
                raw.parse()
                outcome = Outcome(
                    started,
                    time.monotonic(),
                    index,
                    200,
                    raw.headers["x-fleetgate-node"],
                    raw.headers["x-fleetgate-route"],
                )
            except openai.APIStatusError as exc:
                assert_openai_error_body(exc.response.json())
                outcome = Outcome(started, time.monotonic(), index, exc.status_code)
            except openai.APIConnectionError:
                outcome = Outcome(started, time.monotonic(), index, 0)
            self.outcomes.append(outcome)
            await asyncio.sleep(0.005)
        for client in clients:
            await client.close()

    def first_success_after(self, moment: float, shared: bool = True) -> dict[int, float]:
        """Replica index -> seconds from ``moment`` until its first success among the
        requests started after it (routed through the store when ``shared``)."""
        firsts: dict[int, float] = {}
        for o in self.outcomes:
            if o.started > moment and o.status == 200 and (not shared or "shared" in o.route):
                firsts[o.replica] = min(firsts.get(o.replica, float("inf")), o.ended - moment)
        return firsts

    def failures_after(self, moment: float) -> list[int]:
        return [o.status for o in self.outcomes if o.started > moment and o.status != 200]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@dataclass
class Fleet:
    url: str
    replicas: list[Gateway]
    nodes: list[SimNode]
    before: Registry


async def start_fleet(server: RedisServer, procs: list[Process], http: httpx.AsyncClient) -> Fleet:
    """Two replicas, nodes registered every way there is (``--node``, self-registration with
    operator fields, the ops CLI), one drained, a client key with limits, a node removed."""
    nodes = together(
        procs,
        [
            SimNode("--tokens-per-s", "inf", *extra, name=f"n{i}", listening=False)
            for i, extra in ((1, ()), (2, ("--api-key", NODE_KEY)), (3, ()))
        ],
    )
    flags = ("--redis-url", server.url, "--node", nodes[0].url)
    replicas = together(procs, [Gateway(*flags, listening=False) for _ in range(2)])
    for gateway in replicas:
        gateway.wait_models(MODEL)
    added = await http.post(
        f"{replicas[0].url}/nodes/add",
        json={
            "url": nodes[1].url,
            "status": {"models": [MODEL], "role": 1, "speed": 3},
            "api_key": NODE_KEY,
            "weight": 2,
        },
    )
    assert added.status_code == 200, added.text

    def run(*commands: tuple[str, ...]) -> None:
        for args in commands:
            done = ops(server.url, *args)
            assert done.returncode == 0, (args, done.stderr)

    # Three operators at once, each doing two things in order.
    await asyncio.gather(
        asyncio.to_thread(
            run,
            ("nodes", "add", nodes[2].url, "--model", MODEL, "--weight", "3", "--insecure"),
            ("nodes", "drain", nodes[2].url, "--no-wait"),
        ),
        asyncio.to_thread(
            run,
            ("nodes", "add", "http://127.0.0.1:9", "--model", MODEL),
            ("nodes", "remove", "http://127.0.0.1:9"),
        ),
        asyncio.to_thread(
            run,
            ("keys", "add", "team-a", "--key", CLIENT_KEY, "--rpm", "100000"),
            ("keys", "set", "team-a", "--concurrency", "500"),
        ),
    )
    before = await registry_of(server.url)
    assert len(before.nodes) == 3 and before.keys_required and before.key_limits
    await wait_epochs(http, replicas, before.epoch)
    return Fleet(server.url, replicas, nodes, before)


async def ready_of(http: httpx.AsyncClient, gateway: Gateway) -> httpx.Response:
    return await http.get(f"{gateway.url}/ready")


async def wait_epochs(http: httpx.AsyncClient, replicas: list[Gateway], epoch: int) -> None:
    """Until every replica caches the registry at ``epoch`` (they follow it each second)."""

    async def cached() -> bool:
        bodies = [(await ready_of(http, g)).json() for g in replicas]
        return all(b["registry"]["epoch"] == epoch for b in bodies)

    assert await eventually(cached, timeout_s=5)


async def restores(http: httpx.AsyncClient, replicas: list[Gateway]) -> list[float]:
    texts = [(await http.get(f"{g.url}/metrics")).text for g in replicas]
    return [metric(t, "fleetgate_registry_restores_total") for t in texts]


async def check_restored(fleet: Fleet, http: httpx.AsyncClient, restores_before: float) -> None:
    """The registry is the one before, at a higher epoch, and one replica restored it."""
    after = await registry_of(fleet.url)
    assert after.epoch > fleet.before.epoch
    assert {n.id: registry_fields(n) for n in after.nodes} == {
        n.id: registry_fields(n) for n in fleet.before.nodes
    }
    assert after.key_entries == fleet.before.key_entries and after.keys_required
    counts = await restores(http, fleet.replicas)
    assert sum(counts) == restores_before + 1, counts
    await wait_epochs(http, fleet.replicas, after.epoch)
    restored_by = set()
    for gateway in fleet.replicas:
        # Lease renewals that failed while the store refused writes are tried again each
        # second: /ready says so until the next one passes.
        async def is_ready(gateway: Gateway = gateway) -> bool:
            return (await ready_of(http, gateway)).status_code == 200

        assert await eventually(is_ready, timeout_s=5), (await ready_of(http, gateway)).text
        ready = await ready_of(http, gateway)
        assert ready.status_code == 200, ready.text
        registry = ready.json()["registry"]
        assert registry["lost"] is False
        restore = registry["last_restore"]
        restored_by.add(restore["by"])
        assert restore["found_epoch"] < fleet.before.epoch < restore["epoch"], registry
        assert restore["nodes"] == 3 and restore["keys"] == 1
        # Keys came back: a caller without one is refused.
        denied = await http.post(
            f"{gateway.url}/v1/chat/completions", json={"model": MODEL, "messages": []}
        )
        assert_openai_error(denied, 401)
    assert len(restored_by) == 1 and "" not in restored_by


async def check_new_node_routed(fleet: Fleet, http: httpx.AsyncClient) -> None:
    """A node added now (self-registration on one replica) gets traffic on every replica."""
    node = SimNode("--tokens-per-s", "inf", name="late")
    fleet.nodes.append(node)
    added = await http.post(
        f"{fleet.replicas[1].url}/nodes/add", json={"url": node.url, "status": {"models": [MODEL]}}
    )
    assert added.status_code == 200, added.text
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for gateway in fleet.replicas:

        async def reaches_new_node(gateway: Gateway = gateway) -> bool:
            answer = await http.post(
                f"{gateway.url}/v1/chat/completions", json=body, headers=headers
            )
            assert answer.status_code == 200, answer.text
            return bool(answer.headers["x-fleetgate-node"] == node.url)

        assert await eventually(reaches_new_node, timeout_s=5), gateway.output()[-3000:]
    node.close()
    removed = ops(fleet.url, "nodes", "remove", node.url)
    assert removed.returncode == 0, removed.stderr


async def check_no_lease_left(fleet: Fleet, http: httpx.AsyncClient) -> None:
    store = Store.open(fleet.url)
    try:

        async def drained() -> bool:
            counts = [await store.in_flight(n.url) for n in fleet.nodes[:3]]
            texts = [(await http.get(f"{g.url}/metrics")).text for g in fleet.replicas]
            local = [metric(t, "fleetgate_in_flight_total") for t in texts]
            return counts == [0, 0, 0] and local == [0, 0]

        assert await eventually(drained, timeout_s=5)
    finally:
        await store.close()


async def run_traffic(traffic: Traffic) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(traffic.worker(i)) for i in range(WORKERS)]

    async def flowing() -> bool:
        return sum(o.status == 200 for o in traffic.outcomes) >= 40

    assert await eventually(flowing, timeout_s=10), traffic.outcomes[-5:]
    return tasks


async def recover(traffic: Traffic, moment: float) -> dict[str, Any]:
    """Wait until every replica answered a request started after ``moment``; the figures."""

    async def routed_everywhere() -> bool:
        return len(traffic.first_success_after(moment)) == len(traffic.replicas)

    assert await eventually(routed_everywhere, timeout_s=RECOVERY_BOUND_S), (
        traffic.outcomes[-5:],
        traffic.replicas[0].output()[-3000:],
    )
    firsts = traffic.first_success_after(moment)
    failures = traffic.failures_after(moment)
    assert set(failures) <= {503}, failures  # never a 500; an outage is a 503
    return {
        "first_success_s": round(min(firsts.values()), 3),
        "all_replicas_route_s": round(max(firsts.values()), 3),
        "failed_requests": len(failures),
        "requests_after": sum(o.started > moment for o in traffic.outcomes),
    }


async def stop_traffic(traffic: Traffic, tasks: list[asyncio.Task[None]]) -> None:
    traffic.stop.set()
    await asyncio.gather(*tasks)


async def test_flushall_under_traffic_is_restored_by_one_replica(
    server: RedisServer, procs: list[Process], http: httpx.AsyncClient
) -> None:
    fleet = await start_fleet(server, procs, http)
    traffic = Traffic(fleet.replicas)
    tasks = await run_traffic(traffic)
    client = aioredis.Redis.from_url(server.url)
    await client.flushall()
    await client.aclose()
    moment = time.monotonic()  # requests started from now on met the emptied store
    figures = await recover(traffic, moment)
    await stop_traffic(traffic, tasks)
    print("FIGURES flushall", orjson.dumps(figures).decode())

    await check_restored(fleet, http, 0)
    # The replica that restored says what it found; the other may have found it restored.
    restorer = fleet.replicas[(await restores(http, fleet.replicas)).index(1)]
    loss = (await ready_of(http, restorer)).json()["registry"]["last_loss"]
    assert loss["found_epoch"] == 0 and loss["cached_epoch"] == fleet.before.epoch, loss
    assert loss["by_this_replica"] and "this replica restored it" in loss["summary"], loss
    await check_no_lease_left(fleet, http)
    await check_new_node_routed(fleet, http)
    listing = ops(server.url, "nodes", "list")
    assert listing.returncode == 0 and "draining" in listing.stdout, listing
    for gateway in fleet.replicas:
        assert "Traceback" not in gateway.output()


async def test_redis_restarted_empty_is_restored_and_ready_says_so_until_then(
    server: RedisServer, procs: list[Process], http: httpx.AsyncClient
) -> None:
    fleet = await start_fleet(server, procs, http)
    traffic = Traffic(fleet.replicas)
    tasks = await run_traffic(traffic)

    # Killed and restarted empty on the same port, under traffic.
    down = time.monotonic()
    server.stop()
    server.start()
    moment = time.monotonic()
    figures = {"down_s": round(moment - down, 3), **await recover(traffic, moment)}
    print("FIGURES restart", orjson.dumps(figures).decode())
    await check_restored(fleet, http, 0)

    # Restarted empty again, now refusing writes for a while (no replica to acknowledge them,
    # as a fail-over that is not done yet): nothing can be restored, requests go on from the
    # replicas' own registries, /ready says why it is 503 and the ops CLI what it sees.
    fleet.before = await registry_of(fleet.url)
    server.stop()
    server.extra = ["--min-replicas-to-write", "1"]
    server.start()
    refusing = time.monotonic()
    for gateway in fleet.replicas:

        async def says_lost(gateway: Gateway = gateway) -> bool:
            ready = await ready_of(http, gateway)
            return ready.status_code == 503 and ready.json()["registry"]["lost"]

        assert await eventually(says_lost, timeout_s=RECOVERY_BOUND_S), gateway.output()[-3000:]
        body = (await ready_of(http, gateway)).json()
        assert body["ready"] is False
        reason = body["reasons"][0]
        assert "the store lost its registry (epoch 0" in reason, body
        assert "not restored yet" in reason and "NOREPLICAS" in reason, body
    lost = time.monotonic()
    listing = ops(server.url, "nodes", "list")
    assert listing.returncode == 0, listing.stderr
    assert "no nodes registered" in listing.stdout
    assert "holds no registry at all" in listing.stdout, listing.stdout
    assert await registry_of(fleet.url) == Registry(0, ())

    async def served_by_both() -> bool:  # the ops command above held this loop
        return len(traffic.first_success_after(lost, shared=False)) == 2

    assert await eventually(served_by_both, timeout_s=5), traffic.outcomes[-5:]
    since = [o for o in traffic.outcomes if o.started > lost and o.status == 200]
    assert all("state=local" in o.route for o in since), [
        (o.started - lost, o.replica, o.route) for o in since if "state=local" not in o.route
    ]

    client = aioredis.Redis.from_url(server.url)
    moment = time.monotonic()
    await client.config_set("min-replicas-to-write", 0)
    await client.aclose()

    async def shared_again() -> bool:
        done = [o for o in traffic.outcomes if o.started > moment and o.status == 200]
        return {o.replica for o in done if "state=shared" in o.route} == {0, 1}

    assert await eventually(shared_again, timeout_s=RECOVERY_BOUND_S)
    figures = {
        "restored_after_writes_allowed_s": round(time.monotonic() - moment, 3),
        "failed_requests_while_refusing": len(traffic.failures_after(refusing)),
    }
    await stop_traffic(traffic, tasks)
    print("FIGURES refusing", orjson.dumps(figures).decode())
    await check_restored(fleet, http, 1)
    await check_no_lease_left(fleet, http)
    await check_new_node_routed(fleet, http)
    for gateway in fleet.replicas:
        assert "Traceback" not in gateway.output()
