"""The request path end to end: the openai SDK through hypercorn-served gateway replicas to
simulated nodes, sharing a real Redis; retries, timeouts, disconnects, lease upkeep and route
receipts, with failures injected into nodes and into Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from shared_state import Store
from tests.support import MODEL
from tests.support.clients import async_sdk
from tests.support.harness import RedisServer, free_port
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, together

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def start_node(procs: list[Process], *flags: str) -> SimNode:
    node = SimNode(*flags)
    procs.append(node)
    return node


def start_nodes(procs: list[Process], count: int, *flags: str) -> list[SimNode]:
    """``count`` nodes alike, started together."""
    return together(procs, [SimNode(*flags, listening=False) for _ in range(count)])


def start_gateway(
    procs: list[Process],
    redis_url: str | None,
    *nodes: SimNode,
    flags: tuple[str, ...] = (),
) -> Gateway:
    args = [*flags]
    if redis_url:
        args += ["--redis-url", redis_url]
    for node in nodes:
        args += ["--node", node.url]
    gateway = Gateway(*args)
    procs.append(gateway)
    if nodes:
        gateway.wait_models(MODEL)
    return gateway


async def unfinished(gateway: Gateway) -> int:
    async with httpx.AsyncClient() as http:
        status = (await http.get(f"{gateway.url}/nodes/status")).json()
    return sum(int(entry["unfinished"]) for entry in status.values())


async def test_openai_sdk_plain_and_streaming(redis_url: str, procs: list[Process]) -> None:
    a, b = start_nodes(procs, 2, "--tokens-per-s", "inf")
    gateway = start_gateway(procs, redis_url, a, b)
    sdk = async_sdk(gateway.url)
    models = await sdk.models.list()
    assert [m.id for m in models.data] == [MODEL]
    chat = await sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5)
    assert chat.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    completion = await sdk.completions.create(model=MODEL, prompt="x", max_tokens=3)
    assert completion.choices[0].text.split() == ["tok0", "tok1", "tok2"]
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=7, stream=True
    )
    pieces = [
        c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces).split() == [f"tok{i}" for i in range(7)]
    embedding = await sdk.embeddings.create(model=MODEL, input=["a", "b"])
    assert len(embedding.data) == 2
    raw = await sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=1
    )
    assert raw.parse().choices
    assert raw.headers["x-request-id"] and raw.headers["x-fleetgate-node"] in {a.url, b.url}
    await sdk.close()
    assert await unfinished(gateway) == 0


async def test_two_replicas_share_in_flight_state(redis_url: str, procs: list[Process]) -> None:
    nodes = start_nodes(procs, 3, "--tokens-per-s", "50")
    one = start_gateway(procs, redis_url, *nodes)
    two = start_gateway(procs, redis_url)
    two.wait_models(MODEL)
    async with httpx.AsyncClient(timeout=30) as http:
        # A long request held through replica one...
        long_body = {"model": MODEL, "messages": CHAT, "max_tokens": 150, "stream": True}
        async with http.stream("POST", f"{one.url}/v1/chat/completions", json=long_body) as held:
            busy = held.headers["x-fleetgate-node"]
            seen = set()
            # ...makes replica two send every new request elsewhere (min_expected_latency).
            for _ in range(12):
                r = await http.post(
                    f"{two.url}/v1/chat/completions",
                    json={"model": MODEL, "messages": CHAT, "max_tokens": 1},
                )
                assert r.status_code == 200
                seen.add(r.headers["x-fleetgate-node"])
            assert busy not in seen and len(seen) == 2
            assert await unfinished(two) == 1  # replica two sees replica one's lease
    await asyncio.sleep(0.2)
    assert await unfinished(one) == 0


async def test_concurrent_requests_through_two_replicas_leave_no_lease(
    redis_url: str, procs: list[Process]
) -> None:
    nodes = start_nodes(procs, 3, "--tokens-per-s", "2000")
    one = start_gateway(procs, redis_url, *nodes)
    two = start_gateway(procs, redis_url)
    two.wait_models(MODEL)
    sdks = [async_sdk(one.url), async_sdk(two.url)]

    async def call(i: int) -> str:
        sdk = sdks[i % 2]
        raw = await sdk.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=20,
            stream=False,
        )
        assert raw.parse().choices
        return raw.headers["x-fleetgate-node"]

    winners = await asyncio.gather(*(call(i) for i in range(150)))
    counts = {n.url: winners.count(n.url) for n in nodes}
    # Every node takes a share; a node slowed by a busy machine rightly takes less of it.
    assert sum(counts.values()) == 150 and min(counts.values()) >= 10, counts
    for sdk in sdks:
        await sdk.close()
    assert await unfinished(one) == 0 and await unfinished(two) == 0


@pytest.mark.parametrize(
    "fault", ["refuse", "reset", "status_502", "status_503", "status_504", "status_429"]
)
async def test_retry_before_first_byte_goes_elsewhere(
    redis_url: str, procs: list[Process], fault: str
) -> None:
    good = start_node(procs, "--tokens-per-s", "inf")
    gateway = start_gateway(procs, redis_url, good, flags=("--strategy", "round_robin"))
    if fault == "refuse":
        bad_url = f"http://127.0.0.1:{free_port()}"  # registered, but nothing listens there
    else:
        bad_url = start_node(procs, "--fault", fault).url
    async with httpx.AsyncClient() as http:
        r = await http.post(
            f"{gateway.url}/nodes/add", json={"url": bad_url, "status": {"models": [MODEL]}}
        )
        assert r.status_code == 200
    sdk = async_sdk(gateway.url)
    for _ in range(8):
        raw = await sdk.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=2,
        )
        assert raw.parse().choices
        assert raw.headers["x-fleetgate-node"] == good.url
    await sdk.close()
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{gateway.url}/metrics")).text
    retries = [line for line in metrics.splitlines() if line.startswith("fleetgate_retries_total")]
    assert retries and float(retries[0].split()[-1]) >= 1
    assert await unfinished(gateway) == 0


async def test_hanging_node_times_out_and_request_moves_on(
    redis_url: str, procs: list[Process]
) -> None:
    hanging = start_node(procs, "--fault", "hang")
    good = start_node(procs, "--tokens-per-s", "inf")
    gateway = start_gateway(
        procs,
        redis_url,
        hanging,
        good,
        flags=("--first-byte-timeout", "0.5", "--strategy", "round_robin"),
    )
    sdk = async_sdk(gateway.url, timeout=10)
    for _ in range(4):
        t0 = time.monotonic()
        raw = await sdk.chat.completions.with_raw_response.create(
            model=MODEL, messages=CHAT, max_tokens=2
        )
        assert raw.parse().choices
        assert raw.headers["x-fleetgate-node"] == good.url
        assert time.monotonic() - t0 < 5
    await sdk.close()


async def test_node_dying_mid_stream_ends_with_sse_error(
    redis_url: str, procs: list[Process]
) -> None:
    dying = start_node(procs, "--fault", "die_mid_stream", "--tokens-per-s", "200")
    gateway = start_gateway(procs, redis_url, dying)
    sdk = async_sdk(gateway.url, timeout=10)
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=50, stream=True
    )
    got = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert 0 < len(got) < 50
    await sdk.close()
    async with httpx.AsyncClient(timeout=10) as http:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 50, "stream": True}
        async with http.stream("POST", f"{gateway.url}/v1/chat/completions", json=body) as r:
            text = b"".join([chunk async for chunk in r.aiter_raw()]).decode()
    assert '"error"' in text.splitlines()[-2] and "[DONE]" not in text
    assert await unfinished(gateway) == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_releases_lease_and_cancels_upstream(
    redis_url: str, procs: list[Process], stream: bool
) -> None:
    slow = start_node(procs, "--tokens-per-s", "5")
    gateway = start_gateway(procs, redis_url, slow)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 100, "stream": stream}
    async with httpx.AsyncClient(timeout=30) as http:
        if stream:
            async with http.stream("POST", f"{gateway.url}/v1/chat/completions", json=body) as r:
                async for _ in r.aiter_raw():
                    break  # first event arrived: now hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=0.5)

    async def no_lease() -> bool:
        return await unfinished(gateway) == 0

    async def node_idle() -> bool:
        return int(slow.stats()["running"]) == 0

    assert await eventually(no_lease, 1.0)
    # The node stops generating too: the upstream request was cancelled.
    assert await eventually(node_idle, 2.0)


async def test_leases_are_renewed_while_requests_run(redis_url: str, procs: list[Process]) -> None:
    slow = start_node(procs, "--tokens-per-s", "10")
    gateway = start_gateway(procs, redis_url, slow, flags=("--lease-seconds", "0.6"))
    async with httpx.AsyncClient(timeout=30) as http:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 20}
        task = asyncio.ensure_future(http.post(f"{gateway.url}/v1/chat/completions", json=body))
        await asyncio.sleep(1.5)  # well past the lease time
        assert await unfinished(gateway) == 1
        assert (await task).status_code == 200
    assert await unfinished(gateway) == 0


async def test_redis_killed_mid_run_requests_keep_succeeding(procs: list[Process]) -> None:
    server = RedisServer().start()
    try:
        a, b = start_nodes(procs, 2, "--tokens-per-s", "inf")
        gateway = start_gateway(procs, server.url, a, b)
        sdk = async_sdk(gateway.url, timeout=10)
        for _ in range(5):
            await sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
        server.stop()
        seen = set()
        for _ in range(20):
            t0 = time.monotonic()
            raw = await sdk.chat.completions.with_raw_response.create(
                model=MODEL, messages=CHAT, max_tokens=1
            )
            assert raw.parse().choices
            assert raw.http_request is not None and time.monotonic() - t0 < 2.0
            seen.add(raw.headers["x-fleetgate-node"])
        assert seen == {a.url, b.url}
        async with httpx.AsyncClient() as http:
            ready = await http.get(f"{gateway.url}/ready")
            assert ready.status_code == 503 and ready.json()["degraded"] is True
            metrics = (await http.get(f"{gateway.url}/metrics")).text
            assert "fleetgate_degraded 1" in metrics
            add = await http.post(
                f"{gateway.url}/nodes/add", json={"url": a.url, "status": {"models": [MODEL]}}
            )
            assert add.status_code == 503 and add.json()["error"]["code"] == "store_unavailable"
        await sdk.close()
    finally:
        server.close()


async def test_frozen_redis_does_not_stall_requests(procs: list[Process]) -> None:
    server = RedisServer().start()
    try:
        a = start_node(procs, "--tokens-per-s", "inf")
        gateway = start_gateway(procs, server.url, a)
        sdk = async_sdk(gateway.url, timeout=10)
        await sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
        server.pause()
        t0 = time.monotonic()
        for _ in range(10):
            await sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
        # Short store timeouts and the breaker: no 5-second stalls per call.
        assert time.monotonic() - t0 < 5.0
        server.resume()
        await sdk.close()
    finally:
        server.resume() if server.proc else None
        server.close()


async def test_shutdown_releases_the_leases_of_cut_requests(
    redis_url: str, procs: list[Process]
) -> None:
    slow = start_node(procs, "--tokens-per-s", "5")
    gateway = start_gateway(
        procs, redis_url, slow, flags=("--lease-seconds", "60", "--shutdown-timeout", "0.5")
    )
    store = Store.open(redis_url)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            body = {"model": MODEL, "messages": CHAT, "max_tokens": 100, "stream": True}
            async with http.stream("POST", f"{gateway.url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                assert await store.in_flight(slow.url) == 1
                assert gateway.terminate(timeout_s=15) == 0
                with contextlib.suppress(httpx.HTTPError):
                    async for _ in r.aiter_raw():
                        pass
        # Released at shutdown, not left to expire after the 60 s lease.
        assert await store.in_flight(slow.url) == 0
    finally:
        await store.close()


async def test_route_receipts_in_headers_and_access_log(
    redis_url: str, procs: list[Process]
) -> None:
    nodes = start_nodes(procs, 3, "--tokens-per-s", "inf")
    gateway = start_gateway(procs, redis_url, *nodes, flags=("--strategy", "session_affinity"))
    seen: dict[str, set[str]] = {}
    request_ids = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for user in ("alice", "bob", "carol", "dave"):
            for i in range(5):
                body = {"model": MODEL, "messages": CHAT, "max_tokens": 1}
                # The session key: X-Session-ID, else the OpenAI "user" field.
                if i % 2:
                    r = await http.post(
                        f"{gateway.url}/v1/chat/completions",
                        json=body,
                        headers={"x-session-id": user},
                    )
                else:
                    r = await http.post(
                        f"{gateway.url}/v1/chat/completions", json={**body, "user": user}
                    )
                assert r.status_code == 200
                seen.setdefault(user, set()).add(r.headers["x-fleetgate-node"])
                receipt = dict(
                    part.split("=", 1) for part in r.headers["x-fleetgate-route"].split("; ")
                )
                assert receipt["strategy"] == "session_affinity"
                assert receipt["candidates"] == "3" and receipt["attempts"] == "1"
                assert int(receipt["epoch"]) >= 3 and receipt["state"] == "shared"
                request_ids[r.headers["x-request-id"]] = r.headers["x-fleetgate-node"]
    assert all(len(nodes_seen) == 1 for nodes_seen in seen.values()), seen

    def logged() -> dict[str, dict[str, object]]:
        output = gateway.output()
        complete = output[: output.rfind("\n") + 1]  # a line being written is read next time
        lines = [line for line in complete.splitlines() if line.startswith("{")]
        return {rec["request_id"]: rec for rec in map(orjson.loads, lines)}

    async def all_logged() -> bool:
        return set(request_ids) <= set(logged())

    assert await eventually(all_logged, 2)
    records = logged()
    for request_id, node in request_ids.items():
        record = records[request_id]
        assert record["node"] == node and record["status"] == 200
        assert record["strategy"] == "session_affinity" and record["candidates"] == 3


async def test_workers_are_replicas_sharing_redis(redis_url: str, procs: list[Process]) -> None:
    node = start_node(procs, "--tokens-per-s", "inf")
    gateway = start_gateway(procs, redis_url, node, flags=("--workers", "2"))
    sdk = async_sdk(gateway.url)
    for _ in range(10):
        chat = await sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
        assert chat.choices[0].message.content == "tok0 "
    await sdk.close()

    async def two_replicas() -> bool:
        async with httpx.AsyncClient() as http:
            return bool((await http.get(f"{gateway.url}/nodes/replicas")).json()["count"] == 2)

    assert await eventually(two_replicas, 5)


async def test_latency_samples_are_per_output_token(redis_url: str, procs: list[Process]) -> None:
    """40 tokens at 100 tokens/s take about 400 ms; the sample recorded is about 10 ms (per
    token), for a buffered answer (its usage) and for a stream (its events) alike."""
    node = start_node(procs, "--tokens-per-s", "100")
    gateway = start_gateway(procs, redis_url, node)
    sdk = async_sdk(gateway.url)
    await sdk.completions.create(model=MODEL, prompt="x", max_tokens=40)
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=40,
        stream=True,
    )
    async for _ in stream:
        pass
    await sdk.close()
    store = Store.open(redis_url, timeout_s=5.0)
    try:

        async def recorded() -> bool:
            (status,) = await store.status()
            return len(status.latencies_s) == 2

        assert await eventually(recorded, 5)
        (status,) = await store.status()
    finally:
        await store.close()
    for sample in status.latencies_s:
        assert 0.008 <= sample <= 0.02, status.latencies_s
