"""Fleet-wide admission end to end: nodes with a capacity behind two replicas sharing Redis, the
openai SDK as the client. No node ever holds more than its max_inflight (sampled on the nodes
themselves), waiting requests are all answered, in priority order, a queue over its bound or a
wait over its timeout is refused OpenAI-shaped with Retry-After, a client that leaves while
waiting leaves the queue, and a replica killed with requests waiting loses nobody else's (the
queue's logic: tests/unit/test_admission.py)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from tests.support import MODEL
from tests.support.clients import async_sdk
from tests.support.openai_errors import assert_openai_error
from tests.support.polling import eventually, wait_until
from tests.support.processes import Gateway, Process, SimNode, ops, together


def start(
    procs: list[Process], redis_url: str, caps: list[int], *flags: str, replicas: int = 2
) -> tuple[list[SimNode], list[Gateway]]:
    """Nodes with these capacities (20 tokens/s) added by the ops CLI, and replicas on Redis."""
    nodes = together(
        procs, [SimNode("--tokens-per-s", "20", name=f"cap{cap}", listening=False) for cap in caps]
    )
    for node, cap in zip(nodes, caps, strict=True):
        added = ops(
            redis_url, "nodes", "add", node.url, "--model", MODEL, "--max-inflight", str(cap)
        )
        assert added.returncode == 0, added.stderr
    gateways = together(
        procs, [Gateway("--redis-url", redis_url, *flags, listening=False) for _ in range(replicas)]
    )
    for gateway in gateways:
        gateway.wait_models(MODEL)
    return nodes, gateways


async def ask(
    client: openai.AsyncOpenAI, tokens: int, priority: str | None = None
) -> tuple[str, str]:
    """One chat answer of ``tokens`` tokens: its route receipt and its text."""
    headers = {"x-fleetgate-priority": priority} if priority else {}
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=tokens,
        extra_headers=headers,
    )
    answer = raw.parse()
    return raw.headers["x-fleetgate-route"], answer.choices[0].message.content or ""


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def test_no_node_exceeds_its_capacity_and_every_request_is_answered(
    redis_url: str, procs: list[Process]
) -> None:
    nodes, gateways = start(procs, redis_url, [2, 1])
    clients = [async_sdk(g.url, timeout=60) for g in gateways]
    results = await asyncio.gather(*(ask(clients[i % 2], 4) for i in range(30)))
    for client in clients:
        await client.close()
    receipts = [receipt for receipt, _ in results]
    assert all(text for _, text in results)
    # Sampled on the nodes: never more than their capacity at once, over both replicas.
    assert [node.stats()["peak"] for node in nodes] == [2, 1]
    assert sum(node.stats()["requests_total"] for node in nodes) == 30
    queued = [r for r in receipts if "queued_ms=" in r]
    assert len(queued) >= 20  # 3 slots for 30 requests: most waited
    async with httpx.AsyncClient() as http:
        texts = [(await http.get(f"{g.url}/metrics")).text for g in gateways]
    assert sum(metric(t, "fleetgate_admissions_total", how="queued") for t in texts) == len(queued)
    assert sum(metric(t, "fleetgate_admissions_total", how="direct") for t in texts) == 30 - len(
        queued
    )
    assert all(metric(t, "fleetgate_queue_depth") == 0 for t in texts)


async def test_high_priority_goes_first_across_replicas(
    redis_url: str, procs: list[Process]
) -> None:
    _, (one, two) = start(procs, redis_url, [1])
    first, second = async_sdk(one.url, timeout=60), async_sdk(two.url, timeout=60)
    holder = asyncio.ensure_future(ask(first, 10))  # holds the only slot for 0.5 s
    await asyncio.sleep(0.2)
    done: list[str] = []

    async def tagged(client: openai.AsyncOpenAI, priority: str, name: str) -> None:
        await ask(client, 2, priority)
        done.append(name)

    lows = [asyncio.ensure_future(tagged(first, "low", f"low{i}")) for i in range(3)]
    await asyncio.sleep(0.15)
    high = asyncio.ensure_future(tagged(second, "high", "high"))
    await asyncio.gather(holder, *lows, high)
    await first.close()
    await second.close()
    assert done[0] == "high", done


async def test_bounded_queue_and_timeout_are_refused_with_retry_after(
    redis_url: str, procs: list[Process]
) -> None:
    _, (gateway,) = start(
        procs, redis_url, [1], "--max-queue", "1", "--queue-timeout", "0.6", replicas=1
    )
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        body = {"model": MODEL, "messages": [], "max_tokens": 40}  # 2 s on the node
        holder = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
        await asyncio.sleep(0.2)
        waiter = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
        await asyncio.sleep(0.2)
        over = await http.post("/v1/chat/completions", json=body)
        error = assert_openai_error(over, 429, "queue_full")
        assert error["type"] == "rate_limit_error" and int(over.headers["retry-after"]) >= 1
        timed_out = await waiter
        error = assert_openai_error(timed_out, 503, "queue_timeout")
        assert "0.6 s" in error["message"] and int(timed_out.headers["retry-after"]) >= 1
        assert (await holder).status_code == 200
        metrics = (await http.get("/metrics")).text
    assert metric(metrics, "fleetgate_queue_refusals_total", reason="full") == 1
    assert metric(metrics, "fleetgate_queue_refusals_total", reason="timeout") == 1


async def test_a_client_that_leaves_leaves_the_queue(redis_url: str, procs: list[Process]) -> None:
    (node,), (gateway,) = start(procs, redis_url, [1], replicas=1)
    body = {"model": MODEL, "messages": [], "max_tokens": 16}  # 0.8 s on the node
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        holder = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
        await asyncio.sleep(0.2)
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/chat/completions", json=body, timeout=0.3)

        async def left() -> bool:
            text = (await http.get("/metrics")).text
            return metric(text, "fleetgate_queue_refusals_total", reason="client_gone") == 1

        assert await eventually(left, 5)
        assert metric((await http.get("/metrics")).text, "fleetgate_queue_depth") == 0
        assert (await holder).status_code == 200
        # The next request finds the slot free at once: the gone one holds nothing.
        response = await http.post("/v1/chat/completions", json={**body, "max_tokens": 1})
        assert response.status_code == 200
        assert "queued_ms" not in response.headers["x-fleetgate-route"]
    assert node.stats()["requests_total"] == 2  # the gone request never reached the node


async def test_a_replica_killed_while_its_requests_wait_loses_nobody_else(
    redis_url: str, procs: list[Process]
) -> None:
    (node,), (doomed, survivor) = start(procs, redis_url, [1], "--lease-seconds", "1")
    body = {"model": MODEL, "messages": [], "max_tokens": 20}  # 1 s on the node
    async with httpx.AsyncClient(timeout=30) as http:
        holder = asyncio.ensure_future(http.post(f"{survivor.url}/v1/chat/completions", json=body))
        await asyncio.sleep(0.2)
        orphans = [
            asyncio.ensure_future(http.post(f"{doomed.url}/v1/chat/completions", json=body))
            for _ in range(3)
        ]
        await asyncio.sleep(0.2)
        waiting = asyncio.ensure_future(
            http.post(f"{survivor.url}/v1/chat/completions", json={**body, "max_tokens": 1})
        )
        await asyncio.sleep(0.2)
        doomed.kill()
        for orphan in orphans:
            with pytest.raises(httpx.HTTPError):
                await orphan
        assert (await holder).status_code == 200
        started = time.monotonic()
        response = await waiting
        assert response.status_code == 200, response.text
        # Admitted once the dead replica's tickets expired (a lease time), not at a timeout.
        assert time.monotonic() - started < 10
        assert re.search(r"queued_ms=\d+", response.headers["x-fleetgate-route"])
    assert node.stats()["peak"] == 1


async def test_the_embedded_store_queues_the_same_way(procs: list[Process]) -> None:
    node = SimNode("--tokens-per-s", "40")
    gateway = Gateway()
    procs += [node, gateway]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        added = await http.post(
            "/nodes/add", json={"url": node.url, "models": [MODEL], "max_inflight": 1}
        )
        assert added.status_code == 200, added.text
        body = {"model": MODEL, "messages": [], "max_tokens": 4}
        answers = await asyncio.gather(
            *(http.post("/v1/chat/completions", json=body) for _ in range(6))
        )
    assert [a.status_code for a in answers] == [200] * 6
    assert sum("queued_ms=" in a.headers["x-fleetgate-route"] for a in answers) >= 4
    assert node.stats()["peak"] == 1


async def test_distserve_respects_prefill_and_decode_capacity(
    redis_url: str, procs: list[Process]
) -> None:
    prefill, decode = together(
        procs,
        [
            SimNode("--tokens-per-s", "40", "--role", role, name=role.lower(), listening=False)
            for role in ("Prefill", "Decode")
        ],
    )
    flags = ("--redis-url", redis_url, "--serving-strategy", "DistServe")
    gateways = together(procs, [Gateway(*flags, listening=False) for _ in range(2)])
    async with httpx.AsyncClient(timeout=10) as http:
        for node, role, cap in ((prefill, 2, 1), (decode, 3, 2)):
            body = {"url": node.url, "status": {"models": [MODEL], "role": role}}
            response = await http.post(
                f"{gateways[0].url}/nodes/add", json={**body, "max_inflight": cap}
            )
            assert response.status_code == 200, response.text
    for gateway in gateways:
        gateway.wait_models(MODEL)
    clients = [async_sdk(g.url, timeout=60) for g in gateways]
    results = await asyncio.gather(*(ask(clients[i % 2], 8) for i in range(8)))
    for client in clients:
        await client.close()
    assert all(text for _, text in results)
    assert prefill.stats()["peak"] == 1
    assert decode.stats()["peak"] <= 2
    assert any("queued_ms=" in receipt for receipt, _ in results)


async def test_the_queue_shows_in_node_status_and_nodes_list(
    redis_url: str, procs: list[Process]
) -> None:
    (node,), (gateway,) = start(procs, redis_url, [1], replicas=1)
    body = {"model": MODEL, "messages": [], "max_tokens": 60}  # 3 s on the node
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        holder = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
        await asyncio.sleep(0.2)
        waiter = asyncio.ensure_future(
            http.post(
                "/v1/chat/completions",
                json={**body, "max_tokens": 1},
                headers={"x-fleetgate-priority": "low"},
            )
        )
        await asyncio.sleep(0.3)
        status = (await http.get("/nodes/status")).json()
        assert status[node.url]["queue"] == {MODEL: {"high": 0, "normal": 0, "low": 1}}
        assert status[node.url]["max_inflight"] == 1 and status[node.url]["unfinished"] == 1
        listed = await asyncio.to_thread(ops, redis_url, "nodes", "list")
        assert f"queue {MODEL}: 1 waiting (0 high, 0 normal, 1 low)" in listed.stdout
        assert (await holder).status_code == 200
        answered = await waiter
        assert answered.status_code == 200
        assert "queued_ms=" in answered.headers["x-fleetgate-route"]
        status = (await http.get("/nodes/status")).json()
        assert node.url in status, status
        assert status[node.url]["queue"][MODEL] == {"high": 0, "normal": 0, "low": 0}
    # The access log records the wait and the priority (its lines are written within 0.1 s).
    assert wait_until(lambda: '"priority":"low"' in gateway.output(), 3)
    assert '"queued_ms":' in gateway.output()
