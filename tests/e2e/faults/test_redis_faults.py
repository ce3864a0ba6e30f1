"""Redis broken under load: frozen (SIGSTOP, then SIGCONT), killed (SIGKILL, then restarted on
its append-only file, so it comes back with its data) and slow (a loopback proxy delaying every
byte each way). Two gateway replicas take openai SDK traffic throughout; each test asserts what
the clients saw, what ``/ready`` and ``fleetgate_degraded`` said during and after, and that no
lease is left once traffic stops and Redis is healthy. Figures are printed (``-s``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from shared_state import Store
from tests.support import MODEL
from tests.support.harness import RedisServer, wait_for_port
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, together
from tests.support.traffic import Traffic, Watch, tally

LEASE_S = 3.0
FAULT_S = 3.0


class DurableRedis(RedisServer):
    """A redis-server whose append-only file is fsynced at every write: after a SIGKILL,
    :meth:`start` brings it back on the same port with its data."""

    def start(self) -> DurableRedis:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self


class DelayProxy:
    """A TCP proxy on loopback that holds every chunk ``delay_s`` before passing it on, in
    order, in each direction; ``delay_s`` may change at any time, and ``target_port`` too (for
    new connections: an address that moved to another server)."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                sink.write(data)
                await sink.drain()

        sender = asyncio.get_running_loop().create_task(deliver())
        try:
            while data := await source.read(65536):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
            queue.put_nowait((0.0, b""))
            await sender
        except (OSError, asyncio.CancelledError):
            sender.cancel()
        finally:
            sink.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
def durable_redis() -> Iterator[DurableRedis]:
    server = DurableRedis().start()
    yield server
    if server.proc is not None:
        server.resume()  # a test that failed while it was frozen
    server.close()


def start_fleet(procs: list[Process], redis_url: str) -> tuple[SimNode, list[Gateway]]:
    node = SimNode("--tokens-per-s", "200")
    procs.append(node)
    flags = ("--redis-url", redis_url, "--node", node.url, "--lease-seconds", str(LEASE_S))
    gateways = together(procs, [Gateway(*flags, listening=False) for _ in range(2)])
    for gateway in gateways:
        gateway.wait_models(MODEL)
    return node, gateways


async def run_fault(
    name: str,
    gateways: list[Gateway],
    node: SimNode,
    redis_url: str,
    fault: Callable[[], Awaitable[None]],
    heal: Callable[[], Awaitable[None]],
) -> dict[str, Any]:
    """Traffic before, during and after ``fault``; asserts what clients, ``/ready`` and
    ``fleetgate_degraded`` saw and that no lease leaked; returns the figures."""
    urls = [g.url for g in gateways]
    traffic = Traffic(urls).start()
    watch = Watch(urls).start()
    await asyncio.sleep(1.5)
    broken_at = time.monotonic()
    await fault()
    await asyncio.sleep(FAULT_S)
    healed_at = time.monotonic()
    await heal()

    async def all_ready() -> bool:
        async with httpx.AsyncClient(timeout=5) as http:
            return all([(await http.get(f"{url}/ready")).status_code == 200 for url in urls])

    assert await eventually(all_ready, timeout_s=15), [g.output()[-2000:] for g in gateways]
    ready_after_s = time.monotonic() - healed_at
    await asyncio.sleep(1.5)
    answers = await traffic.stop()
    readings = await watch.stop()

    before = tally(answers, until_s=broken_at)
    during = tally(answers, since_s=broken_at, until_s=healed_at)
    after = tally(answers, since_s=healed_at)
    during_readings = [r for r in readings if broken_at <= r.at_s < healed_at]
    figures = {
        "fault": name,
        "requests": len(answers),
        "statuses_before": dict(before),
        "statuses_during": dict(during),
        "statuses_after": dict(after),
        "ready_503_seen_during": any(r.ready == 503 for r in during_readings),
        "degraded_seen_during": any(r.degraded > 0 for r in during_readings),
        "ready_after_heal_s": round(ready_after_s, 2),
        "degraded_after_heal_s": round(watch.span_s(healed_at, degraded=True), 2),
    }
    print(f"redis {name}:", json.dumps(figures))
    # Every request got an HTTP answer (status 0: none), and never a 500.
    assert 0 not in before + during + after and 500 not in during + after, figures
    assert set(before) == {200} and sum(during.values()) > 0, figures
    assert figures["degraded_seen_during"] and figures["ready_503_seen_during"], figures
    last = {r.url: r for r in readings}
    assert all(r.ready == 200 and r.degraded == 0 for r in last.values()), last

    # No lease left behind: releases that Redis missed expire within the lease time.
    async def no_lease() -> bool:
        async with httpx.AsyncClient(timeout=5) as http:
            status = (await http.get(f"{urls[0]}/nodes/status")).json()
        return sum(int(entry["unfinished"]) for entry in status.values()) == 0

    assert await eventually(no_lease, timeout_s=LEASE_S + 5)
    store = Store.open(redis_url, timeout_s=2.0)
    try:
        assert await store.in_flight(node.url) == 0
        assert [n.id for n in (await store.registry()).nodes] == [node.url]
    finally:
        await store.close()
    for gateway in gateways:
        assert "Traceback" not in gateway.output()
    return figures


async def test_redis_frozen_then_thawed(durable_redis: DurableRedis, procs: list[Process]) -> None:
    node, gateways = start_fleet(procs, durable_redis.url)

    async def freeze() -> None:
        durable_redis.pause()

    async def thaw() -> None:
        durable_redis.resume()

    figures = await run_fault("frozen", gateways, node, durable_redis.url, freeze, thaw)
    # Routing fails open on the local snapshot: the clients saw no failure.
    assert set(figures["statuses_during"]) == {200}, figures


async def test_redis_killed_then_restarted_with_its_data(
    durable_redis: DurableRedis, procs: list[Process]
) -> None:
    node, gateways = start_fleet(procs, durable_redis.url)

    async def kill() -> None:
        durable_redis.stop()

    async def restart() -> None:
        await asyncio.to_thread(durable_redis.start)

    figures = await run_fault("killed", gateways, node, durable_redis.url, kill, restart)
    assert set(figures["statuses_during"]) == {200}, figures


async def test_redis_slow_behind_a_delaying_proxy(
    durable_redis: DurableRedis, procs: list[Process]
) -> None:
    proxy = await DelayProxy(durable_redis.port, delay_s=0.0).start()
    try:
        # In a thread: the proxy serves on this event loop while the gateways start.
        node, gateways = await asyncio.to_thread(
            start_fleet, procs, f"redis://127.0.0.1:{proxy.port}/0"
        )

        async def slow_down() -> None:
            proxy.delay_s = 0.2  # per direction: 0.4 s a round trip, over the 0.25 s timeout

        async def speed_up() -> None:
            proxy.delay_s = 0.0

        figures = await run_fault("slow", gateways, node, durable_redis.url, slow_down, speed_up)
        assert set(figures["statuses_during"]) == {200}, figures
    finally:
        with contextlib.suppress(Exception):
            await proxy.close()


async def test_failover_behind_one_address_is_followed(procs: list[Process]) -> None:
    """A fail-over without Sentinel: the address the gateways use moves to the promoted
    replica (a VIP or a DNS name; here a proxy retargeted) while the old master turns replica.
    Connections still open to it get READONLY; the store drops them and the new ones reach
    the new master, so renewals and admin writes work again."""
    first = RedisServer().start()
    second = RedisServer("--replicaof", "127.0.0.1", str(first.port)).start()
    proxy = await DelayProxy(first.port, delay_s=0.0).start()
    try:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        node, gateways = await asyncio.to_thread(start_fleet, procs, url)
        replica = aioredis.Redis(port=second.port, decode_responses=True)
        old = aioredis.Redis(port=first.port, decode_responses=True)
        try:

            async def in_sync() -> bool:
                info = await replica.info("replication")
                return bool(info.get("master_link_status") == "up")

            assert await eventually(in_sync, timeout_s=10)
            traffic = Traffic([g.url for g in gateways]).start()
            await asyncio.sleep(1.0)
            switched_at = time.monotonic()
            await replica.replicaof("NO", "ONE")
            proxy.target_port = second.port
            await old.replicaof("127.0.0.1", second.port)

            async def admin_write_works() -> bool:
                async with httpx.AsyncClient(timeout=5) as http:
                    add = await http.post(
                        f"{gateways[0].url}/nodes/add",
                        json={"url": "http://127.0.0.1:9", "status": {"models": [MODEL]}},
                    )
                return add.status_code == 200

            assert await eventually(admin_write_works, timeout_s=10), gateways[0].output()
            admin_s = time.monotonic() - switched_at

            async def all_ready() -> bool:
                async with httpx.AsyncClient(timeout=5) as http:
                    return all(
                        [(await http.get(f"{g.url}/ready")).status_code == 200 for g in gateways]
                    )

            assert await eventually(all_ready, timeout_s=10)
            answers = await traffic.stop()
        finally:
            await replica.aclose()
            await old.aclose()
        statuses = tally(answers)
        print(
            "redis fail-over behind one address:",
            json.dumps({"statuses": dict(statuses), "admin_write_after_s": round(admin_s, 2)}),
        )
        assert set(statuses) == {200}, statuses
        store = Store.open(second.url, timeout_s=2.0)
        try:
            nodes = {n.id for n in (await store.registry()).nodes}
            assert nodes == {node.url, "http://127.0.0.1:9"}

            async def no_lease() -> bool:
                return await store.in_flight(node.url) == 0

            assert await eventually(no_lease, timeout_s=LEASE_S + 5)
        finally:
            await store.close()
    finally:
        await proxy.close()
        second.close()
        first.close()
