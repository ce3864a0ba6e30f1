"""Redis fail-over with Sentinel, for real: a master, a replica and three sentinels on loopback,
two gateway replicas on a ``redis+sentinel://`` URL under openai SDK traffic, the master
SIGKILLed; the sentinels promote the replica, the gateways follow it, requests keep succeeding,
no lease leaks and admin writes work again. The figures are printed (``-s``) for the report."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis

from shared_state import InvalidInput, Store
from tests.support import MODEL
from tests.support.harness import RedisServer, free_port, wait_for_port
from tests.support.openai_errors import assert_openai_error
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, ops
from tests.support.traffic import Traffic, Watch, tally

SERVICE = "fleet"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def start_sentinel(
    folder: Path, procs: list[Process], master: RedisServer, quorum: int, extra: str = ""
) -> int:
    """A ``redis-server --sentinel`` watching ``master`` with short timeouts; its port."""
    port = free_port()
    conf = folder / f"sentinel-{port}.conf"  # a sentinel rewrites its file: one each
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {folder}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} {quorum}\n"
        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
        f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
        f"sentinel parallel-syncs {SERVICE} 1\n{extra}"
    )
    procs.append(Process([master.exe, str(conf), "--sentinel"], f"sentinel-{port}"))
    wait_for_port(port)
    return port


class Sentinels:
    """A master, its replica and three sentinels watching them, all on loopback."""

    def __init__(self, folder: Path, procs: list[Process]) -> None:
        self.master = RedisServer().start()
        self.replica = RedisServer("--replicaof", "127.0.0.1", str(self.master.port)).start()
        self.ports = [start_sentinel(folder, procs, self.master, quorum=2) for _ in range(3)]
        self.processes = procs[-3:]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    async def master_port(self, sentinel_port: int) -> int:
        client = aioredis.Redis(port=sentinel_port, decode_responses=True)
        try:
            address = cast(Any, await client.sentinel_get_master_addr_by_name(SERVICE))
            return int(address[1])
        finally:
            await client.aclose()

    async def settled(self) -> bool:
        """Every sentinel sees the two others and the replica, and the replica is in sync."""
        for port in self.ports:
            client = aioredis.Redis(port=port, decode_responses=True)
            try:
                state = cast(dict[str, Any], await client.sentinel_master(SERVICE))
            finally:
                await client.aclose()
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        client = aioredis.Redis(port=self.replica.port, decode_responses=True)
        try:
            info = await client.info("replication")
        finally:
            await client.aclose()
        return bool(info.get("master_link_status") == "up")

    def close(self) -> None:
        self.replica.close()
        self.master.close()


@pytest.fixture
def sentinels(tmp_path: Path, procs: list[Process]) -> Iterator[Sentinels]:
    fleet = Sentinels(tmp_path, procs)
    yield fleet
    fleet.close()


async def unfinished(gateway: Gateway) -> int:
    async with httpx.AsyncClient(timeout=5) as http:
        status = (await http.get(f"{gateway.url}/nodes/status")).json()
    return sum(int(entry["unfinished"]) for entry in status.values())


async def test_master_killed_under_load_gateways_follow_the_promoted_replica(
    sentinels: Sentinels, procs: list[Process]
) -> None:
    assert await eventually(sentinels.settled, timeout_s=20), "sentinels never settled"
    node = SimNode("--tokens-per-s", "200")
    spare = SimNode("--tokens-per-s", "inf")
    procs += [node, spare]
    gateways = [
        Gateway("--redis-url", sentinels.url, "--node", node.url, "--lease-seconds", "3")
        for _ in range(2)
    ]
    procs += gateways
    for gateway in gateways:
        gateway.wait_models(MODEL)
    urls = [g.url for g in gateways]

    traffic = Traffic(urls).start()
    watch = Watch(urls).start()
    await asyncio.sleep(2.0)
    killed_at = time.monotonic()
    sentinels.master.stop()  # SIGKILL

    async def promoted() -> bool:
        ports = [await sentinels.master_port(p) for p in sentinels.ports]
        return all(port == sentinels.replica.port for port in ports)

    assert await eventually(promoted, timeout_s=20), "the replica was never promoted"
    promoted_s = time.monotonic() - killed_at

    async def admin_write_works() -> bool:
        async with httpx.AsyncClient(timeout=5) as http:
            add = await http.post(f"{gateways[0].url}/nodes/add", json={"url": spare.url})
        return add.status_code == 200

    assert await eventually(admin_write_works, timeout_s=20), gateways[0].output()
    admin_s = time.monotonic() - killed_at

    async def both_ready() -> bool:
        async with httpx.AsyncClient(timeout=5) as http:
            statuses = [(await http.get(f"{url}/ready")).status_code for url in urls]
        return statuses == [200, 200]

    assert await eventually(both_ready, timeout_s=20)
    ready_s = time.monotonic() - killed_at
    await asyncio.sleep(2.0)  # traffic on the new master
    answers = await traffic.stop()
    await watch.stop()

    before, during = tally(answers, until_s=killed_at), tally(answers, since_s=killed_at)
    failed = sum(n for status, n in during.items() if status != 200)
    figures = {
        "requests_sent": len(answers),
        "requests_failed": sum(n for status, n in (before + during).items() if status != 200),
        "statuses_after_kill": dict(during),
        "promotion_s": round(promoted_s, 2),
        "degraded_s": round(watch.span_s(killed_at, degraded=True), 2),
        "not_ready_s": round(watch.span_s(killed_at, degraded=False), 2),
        "admin_write_after_s": round(admin_s, 2),
        "ready_after_s": round(ready_s, 2),
    }
    print("sentinel fail-over:", json.dumps(figures))
    assert set(before) == {200}, before
    # Routing fails open on the local snapshot while the master is gone: a few failures at
    # most, none of them a 500.
    assert failed <= max(3, len(answers) // 100), figures
    assert 500 not in during, figures
    assert watch.seen(killed_at, degraded=True), "fleetgate_degraded never said 1"

    # Nothing leaks: leases of requests cut by the switch expire, the rest were released.
    async def drained() -> bool:
        return all([await unfinished(g) == 0 for g in gateways])

    assert await eventually(drained, timeout_s=10)
    # The ops CLI writes through the sentinels too, to the new master.
    done = await asyncio.to_thread(ops, sentinels.url, "nodes", "remove", spare.url)
    assert done.returncode == 0, done.stderr
    store = Store.open(sentinels.url, timeout_s=2.0)
    try:
        assert {n.id for n in (await store.registry()).nodes} == {node.url}
        assert await store.in_flight(node.url) == 0
    finally:
        await store.close()
    for gateway in gateways:
        assert "Traceback" not in gateway.output()


async def registers_a_node(url: str) -> bool:
    """A Store on ``url`` writes a node and reads it back through the sentinel's master."""
    store = Store.open(url, timeout_s=2.0)
    try:
        await store.add_node("http://127.0.0.1:9", [MODEL])
        return [n.id for n in (await store.registry()).nodes] == ["http://127.0.0.1:9"]
    finally:
        await store.close()


async def test_sentinel_url_logs_in_to_the_master_as_its_acl_user(
    tmp_path: Path, procs: list[Process]
) -> None:
    acl = ("--user", "fleet", "on", ">s3cret", "~*", "&*", "+@all", "--user", "default", "off")
    master = RedisServer(*acl).start()
    try:
        extra = f"sentinel auth-user {SERVICE} fleet\nsentinel auth-pass {SERVICE} s3cret\n"
        port = start_sentinel(tmp_path, procs, master, quorum=1, extra=extra)
        assert await registers_a_node(f"redis+sentinel://fleet:s3cret@127.0.0.1:{port}/{SERVICE}")
    finally:
        master.close()


async def test_sentinel_url_logs_in_to_sentinels_that_require_a_password(
    tmp_path: Path, procs: list[Process]
) -> None:
    master = RedisServer().start()
    try:
        port = start_sentinel(tmp_path, procs, master, quorum=1, extra="requirepass sent-pw\n")
        url = f"redis+sentinel://127.0.0.1:{port}/{SERVICE}"
        assert await registers_a_node(f"{url}?sentinel_password=sent-pw")
        with pytest.raises(InvalidInput):
            Store.open(f"{url}?sentinel_pasword=sent-pw")  # a misspelt option is refused
        with pytest.raises(InvalidInput):
            Store.open(f"{url}/not-a-db")
    finally:
        master.close()


async def test_sentinels_that_do_not_answer_are_named_in_one_short_line(
    procs: list[Process],
) -> None:
    """redis-py names each sentinel by its whole client's repr; neither the ops CLI nor an
    admin answer passes that on."""
    url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/{SERVICE}"
    done = await asyncio.to_thread(ops, url, "nodes", "list")
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"No master found for '{SERVICE}'" in lines[0], lines
    assert len(lines[0]) < 400 and "<redis" not in lines[0], lines
    gateway = Gateway("--redis-url", url)
    procs.append(gateway)
    async with httpx.AsyncClient(timeout=10) as http:
        add = await http.post(
            f"{gateway.url}/nodes/add",
            json={"url": "http://127.0.0.1:9", "status": {"models": [MODEL]}},
        )
    error = assert_openai_error(add, 503, "store_unavailable")
    assert len(error["message"]) < 400 and "<redis" not in error["message"], error


async def test_requests_keep_flowing_when_the_sentinels_and_the_master_are_gone(
    sentinels: Sentinels, procs: list[Process]
) -> None:
    """With nothing to ask for the master, each store call fails within the store timeout
    (redis-py's default retries backed off for seconds per sentinel): requests go on from
    the local snapshot, each answered before the client's own timeout."""
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    gateway = Gateway("--redis-url", sentinels.url, "--node", node.url)
    procs.append(gateway)
    gateway.wait_models(MODEL)
    traffic = Traffic([gateway.url], workers=2, max_requests=10, timeout_s=5.0).start()
    assert set(tally(await traffic.finish())) == {200}
    for sentinel in sentinels.processes:
        sentinel.kill()
    sentinels.master.stop()
    traffic = Traffic([gateway.url], workers=2, max_requests=20, timeout_s=5.0).start()
    answers = await traffic.finish()
    assert tally(answers) == {200: 20}, answers
    assert "Traceback" not in gateway.output()
