"""Admission while Redis is frozen: the replica admits by its own counts (a node's capacity
still holds for what it sends), says so in its receipts and ``/ready``, and nothing waits
forever: a request that finds no room locally waits for one of this replica's requests to end,
or is refused with 503 ``queue_timeout`` at the queue timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from tests.support import MODEL
from tests.support.harness import RedisServer
from tests.support.openai_errors import assert_openai_error
from tests.support.processes import Gateway, Process, SimNode, ops


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.resume()
    server.stop()


async def test_redis_frozen_the_replica_admits_by_its_own_counts(
    own_redis: RedisServer, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "40")
    procs.append(node)
    added = ops(own_redis.url, "nodes", "add", node.url, "--model", MODEL, "--max-inflight", "2")
    assert added.returncode == 0, added.stderr
    gateway = Gateway("--redis-url", own_redis.url, "--queue-timeout", "3")
    procs.append(gateway)
    gateway.wait_models(MODEL)
    body = {"model": MODEL, "messages": [], "max_tokens": 8}  # 0.2 s on the node
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
        own_redis.pause()
        try:
            answers = await asyncio.gather(
                *(http.post("/v1/chat/completions", json=body) for _ in range(8))
            )
            assert [a.status_code for a in answers] == [200] * 8
            receipts = [a.headers["x-fleetgate-route"] for a in answers]
            assert all("state=local" in r for r in receipts), receipts
            assert sum("queued_ms=" in r for r in receipts) >= 5  # 2 slots for 8 requests
            assert node.stats()["peak"] <= 2
            ready = await http.get("/ready")
            assert ready.status_code == 503 and "degraded" in ready.text.lower()
            # A request that cannot get a local slot in time is refused, not kept forever.
            long_body = {**body, "max_tokens": 200}  # 5 s each
            holders = [
                asyncio.ensure_future(http.post("/v1/chat/completions", json=long_body))
                for _ in range(2)
            ]
            await asyncio.sleep(0.3)
            refused = await http.post("/v1/chat/completions", json=body)
            error = assert_openai_error(refused, 503, "queue_timeout")
            assert "own counts" in error["message"]
            assert [(await h).status_code for h in holders] == [200, 200]
        finally:
            own_redis.resume()
    assert "Traceback" not in gateway.output()
