"""Processes of the fleet killed or paused under load: a gateway replica SIGKILLed, a replica
SIGSTOPped past its lease time and SIGCONTed, the leading health-checker killed, and a leader
paused past its lease (fenced). Each test asserts what the clients saw, that no lease leaked,
and prints the figures it measured (seconds to take over, requests failed)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from shared_state import NodeState, Store
from tests.support import MODEL
from tests.support.clients import async_sdk
from tests.support.polling import eventually
from tests.support.processes import Checker, Gateway, Process, SimNode, together

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
LEASE_S = 2.0  # replicas' lease time: short, so that expiry is seen within the test


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    store = Store.open(redis_url, timeout_s=5.0)
    yield store
    await store.close()


def replicas(procs: list[Process], redis_url: str, *nodes: SimNode, count: int) -> list[Gateway]:
    """``count`` gateway replicas on ``redis_url`` with the short lease time, started together,
    their nodes registered."""
    flags = ["--redis-url", redis_url, "--lease-seconds", str(LEASE_S)]
    for node in nodes:
        flags += ["--node", node.url]
    gateways = together(procs, [Gateway(*flags, listening=False) for _ in range(count)])
    for gateway in gateways:
        gateway.wait_models(MODEL)
    return gateways


async def stream_tokens(sdk: openai.AsyncOpenAI, max_tokens: int) -> int | Exception:
    """The content pieces of one streamed chat, or the error it ended with."""
    try:
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=max_tokens, stream=True
        )
        pieces = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
        return pieces
    except (openai.APIError, httpx.HTTPError) as exc:
        return exc


def gauge(gateway: Gateway, name: str) -> float:
    """A sample without labels from the replica's ``/metrics``."""
    for line in httpx.get(f"{gateway.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in {gateway.url}/metrics")


async def test_replica_killed_under_load_leases_expire_other_serves_all(
    redis_url: str, store: Store, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "20", "--slots", "32")
    procs.append(node)
    a, b = replicas(procs, redis_url, node, count=2)
    sdk_a, sdk_b = async_sdk(a.url, timeout=30), async_sdk(b.url, timeout=30)
    through_a = [asyncio.create_task(stream_tokens(sdk_a, 40)) for _ in range(8)]
    through_b = [asyncio.create_task(stream_tokens(sdk_b, 40)) for _ in range(8)]

    async def all_in_flight() -> bool:
        return await store.in_flight(node.url) == 16

    assert await eventually(all_in_flight, 5)
    a.proc.kill()  # SIGKILL: no clean-up at all
    killed_at = time.monotonic()
    seen_a = await asyncio.gather(*through_a)
    failed = [r for r in seen_a if isinstance(r, Exception)]
    # Its clients' connections went with it; nothing through the other replica failed.
    assert len(failed) == len(through_a), seen_a
    assert await asyncio.gather(*through_b) == [40] * len(through_b)
    answers = await asyncio.gather(
        *(
            sdk_b.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
            for _ in range(20)
        )
    )
    assert all(a.choices[0].message.content == "tok0 " for a in answers)

    async def no_lease() -> bool:
        return await store.in_flight(node.url) == 0

    assert await eventually(no_lease, LEASE_S + 3)
    freed_s = time.monotonic() - killed_at
    assert freed_s <= LEASE_S + 3
    assert gauge(b, "fleetgate_in_flight_total") == 0
    print(
        f"replica SIGKILLed: {len(failed)} of {len(through_a) + len(through_b) + 20} requests "
        f"failed (all in flight through it), leases gone {freed_s:.2f}s after (lease {LEASE_S}s)"
    )
    await sdk_a.close()
    await sdk_b.close()


async def test_replica_paused_past_its_lease_counts_right_after_sigcont(
    redis_url: str, store: Store, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "10", "--slots", "32")
    procs.append(node)
    a, b = replicas(procs, redis_url, node, count=2)
    # Closed however the test ends: a client left open is reported by a later test.
    async with async_sdk(a.url, timeout=60) as sdk_a, async_sdk(b.url, timeout=60) as sdk_b:
        through_a = [asyncio.create_task(stream_tokens(sdk_a, 40)) for _ in range(4)]

        async def in_flight_is(n: int) -> bool:
            return await store.in_flight(node.url) == n

        assert await eventually(lambda: in_flight_is(4), 5)
        a.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            # A paused replica cannot renew: its leases expire, the node looks idle again.
            assert await eventually(lambda: in_flight_is(0), LEASE_S + 3)
            expired_s = time.monotonic() - stopped_at
            through_b = [asyncio.create_task(stream_tokens(sdk_b, 60)) for _ in range(3)]
            assert await eventually(lambda: in_flight_is(3), 5)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        # Expired leases are not revived by the renewals that follow: never counted twice.
        samples = []
        for _ in range(10):
            samples.append(await store.in_flight(node.url))
            await asyncio.sleep(0.1)
        assert samples == [3] * len(samples), samples
        # The clients of the paused replica got whole answers, only late.
        assert await asyncio.gather(*through_a) == [40] * len(through_a)
        assert await asyncio.gather(*through_b) == [60] * len(through_b)
        assert await store.in_flight(node.url) == 0
        # Each replica's own count went back to zero, not below.
        assert gauge(a, "fleetgate_in_flight_total") == 0
        assert gauge(b, "fleetgate_in_flight_total") == 0
        print(f"replica SIGSTOPped: its leases expired {expired_s:.2f}s after (lease {LEASE_S}s)")


async def leader_of(store: Store) -> str:
    raw = await store.client.get(store.keys.leader)
    return (raw.decode() if isinstance(raw, bytes) else str(raw or "")).split(" ")[0]


async def keep_asking(gateway: Gateway, stop: asyncio.Event) -> list[int]:
    """Statuses of sequential small chats through ``gateway`` until ``stop``."""
    statuses = []
    async with httpx.AsyncClient(timeout=10) as http:
        while not stop.is_set():
            r = await http.post(
                f"{gateway.url}/v1/chat/completions",
                json={"model": MODEL, "messages": CHAT, "max_tokens": 1},
            )
            statuses.append(r.status_code)
            await asyncio.sleep(0.05)
    return statuses


async def test_leading_checker_killed_standby_takes_over(
    redis_url: str, store: Store, procs: list[Process]
) -> None:
    doomed, kept = together(
        procs, [SimNode("--tokens-per-s", "inf", listening=False) for _ in range(2)]
    )
    (gateway,) = replicas(procs, redis_url, doomed, kept, count=1)
    first = Checker(redis_url, "first", "--fall", "2", "--timeout", "0.5")
    procs.append(first)
    assert await eventually(lambda: asyncio.to_thread(first.leads), 10)
    second = Checker(redis_url, "second", "--fall", "2", "--timeout", "0.5")
    procs.append(second)
    stop = asyncio.Event()
    clients = asyncio.create_task(keep_asking(gateway, stop))
    try:
        first.kill()
        killed_at = time.monotonic()
        assert await eventually(lambda: asyncio.to_thread(second.leads), 5)
        takeover_s = time.monotonic() - killed_at
        assert await leader_of(store) == "second"
        doomed.kill()
        doomed_at = time.monotonic()

        async def marked() -> bool:
            return (await store.get_node(doomed.url)).state is NodeState.UNHEALTHY

        assert await eventually(marked, 5)
        marked_s = time.monotonic() - doomed_at
    finally:
        stop.set()
        statuses = await clients
    # Requests that met the dead node were retried on the other one before the first byte.
    assert statuses and set(statuses) == {200}, statuses
    assert await store.in_flight(kept.url) == 0
    assert takeover_s <= 1.0 + 2.0  # the lease (1 s), plus the standby's renewal period
    print(
        f"leading checker SIGKILLed: standby led {takeover_s:.2f}s after (lease 1s), a dead "
        f"node unhealthy {marked_s:.2f}s after its death; {len(statuses)} requests, 0 failed"
    )


async def test_paused_leader_is_fenced_when_it_wakes(
    redis_url: str, store: Store, procs: list[Process]
) -> None:
    hung, kept = together(
        procs, [SimNode("--tokens-per-s", "inf", listening=False) for _ in range(2)]
    )
    (gateway,) = replicas(procs, redis_url, hung, kept, count=1)
    hung.fault("hang")  # its generation probe takes the whole timeout: rounds last 2 s
    flags = ("--fall", "1", "--timeout", "2", "--generate-every", "0.01")
    first = Checker(redis_url, "first", *flags)
    procs.append(first)
    assert await eventually(lambda: asyncio.to_thread(first.leads), 10)

    async def hung_unhealthy() -> bool:
        return (await store.get_node(hung.url)).state is NodeState.UNHEALTHY

    assert await eventually(hung_unhealthy, 10)  # clients no longer reach it
    second = Checker(redis_url, "second", *flags)
    procs.append(second)
    stop = asyncio.Event()
    clients = asyncio.create_task(keep_asking(gateway, stop))
    try:
        # Pause the leader inside a round (its probe of the hung node has just begun), so
        # that it wakes up holding a report to write with the token it no longer owns.
        seen = int(hung.stats()["requests_total"])
        events_before = await store.client.llen(store.keys.events)

        async def round_begun() -> bool:
            return int((await asyncio.to_thread(hung.stats))["requests_total"]) > seen

        assert await eventually(round_begun, 10)
        first.proc.send_signal(signal.SIGSTOP)
        paused_at = time.monotonic()
        try:
            assert await eventually(lambda: asyncio.to_thread(second.leads), 5)
            takeover_s = time.monotonic() - paused_at
        finally:
            first.proc.send_signal(signal.SIGCONT)

        async def fenced() -> bool:
            count = await asyncio.to_thread(first.metric, "fleetgate_checker_fenced_writes_total")
            return count >= 1

        assert await eventually(fenced, 10), first.output()
        assert not first.leads() and second.leads()
        assert await leader_of(store) == "second"
    finally:
        stop.set()
        statuses = await clients
        hung.fault("none")
    # Nothing the woken leader meant to write got in: every transition since the takeover
    # was made by the new leader.
    events = await store.client.lrange(store.keys.events, 0, -1)
    since = events[: len(events) - events_before]  # newest first
    assert not any(b'"by":"first"' in e for e in since), since
    assert first.alive() and "Traceback" not in first.output()
    assert statuses and set(statuses) == {200}, statuses
    assert await store.in_flight(kept.url) == 0
    print(
        f"leader SIGSTOPped mid-round: standby led {takeover_s:.2f}s after (lease 1s); the "
        f"woken leader's writes were refused and counted; {len(statuses)} requests, 0 failed"
    )
