"""Per-key limits: requests per minute and concurrency of client API keys, on both backends,
and end to end: a key over its limit gets 429 from either of two replicas sharing Redis."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import orjson
import pytest

from shared_state import InvalidInput, Store, StoreUnavailable, UnknownKey, key_digest
from shared_state import limits as key_limits
from tests.conftest import StoreFactory
from tests.fleet import Gateway, Process, SimNode, eventually, ops, replicas_of

MODEL = "sim-model"
KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
DIGEST_A = key_digest(KEY_A)


async def limit_keys(store: Store) -> list[str]:
    """Every key of the per-key limit state in the store."""
    return sorted(str(k) for k in await store.client.keys(f"{store.keys.tag()}:limit:*"))


class TestStoredLimits:
    async def test_limits_live_with_the_key(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        key, created = await store.add_key("team-a", KEY_A, rpm=3, concurrency=2)
        assert created and (key.rpm, key.concurrency) == (3, 2)
        await store.add_key("team-b", KEY_B)
        registry = await store.registry()
        assert registry.key_digests == {DIGEST_A, key_digest(KEY_B)}
        assert registry.key_limits == {DIGEST_A: (3, 2)}  # unlimited keys are absent

        epoch = await store.epoch()
        again, created = await store.add_key("team-a", KEY_A, rpm=3)  # idempotent
        assert not created and again == key and await store.epoch() == epoch
        again, created = await store.add_key("team-a", KEY_A)  # no flags: limits kept
        assert again == key and await store.epoch() == epoch
        changed, created = await store.add_key("team-a", KEY_A, rpm=5)
        assert not created and (changed.rpm, changed.concurrency) == (5, 2)
        assert await store.epoch() == epoch + 1  # replicas learn the change

        limited, did = await store.set_key_limits("team-a", concurrency=0)
        assert did and (limited.rpm, limited.concurrency) == (5, 0)
        assert await store.epoch() == epoch + 2
        same, did = await store.set_key_limits("team-a", rpm=5, concurrency=0)
        assert not did and same == limited and await store.epoch() == epoch + 2
        assert (await store.registry()).key_limits == {DIGEST_A: (5, 0)}
        await store.set_key_limits("team-a", rpm=0)
        assert (await store.registry()).key_limits == {}
        assert [(k.name, k.rpm, k.concurrency) for k in await store.list_keys()] == [
            ("team-a", 0, 0),
            ("team-b", 0, 0),
        ]

        with pytest.raises(UnknownKey):
            await store.set_key_limits("nobody", rpm=1)
        with pytest.raises(InvalidInput):
            await store.set_key_limits("team-a", rpm=-1)
        with pytest.raises(InvalidInput):
            await store.add_key("team-c", "key-c-0123456789abcdef", concurrency=True)
        assert [k.name for k in await store.list_keys()] == ["team-a", "team-b"]


class TestRateLimit:
    async def test_burst_of_rpm_then_refused_with_retry_after(
        self, store_factory: StoreFactory
    ) -> None:
        replicas = [store_factory(seed=1), store_factory(seed=2)]
        for i in range(3):
            decision = await key_limits.acquire(replicas[i % 2], DIGEST_A, 3, 0, f"r:{i}")
            assert decision.allowed and not decision.leased and decision.limit == ""
        for i in range(2):  # refused on either replica; a refusal counts nothing
            decision = await key_limits.acquire(replicas[i], DIGEST_A, 3, 0, f"r:x{i}")
            assert not decision.allowed and decision.limit == "rpm"
            # The bucket refills one request every 20 s: the wait is about that, never a minute.
            assert 0 < decision.retry_after_s <= 60
            assert 15 < decision.retry_after_s <= 20
        other = await key_limits.acquire(replicas[0], key_digest(KEY_B), 3, 0, "r:b")
        assert other.allowed  # each key has its own bucket
        # The state is one number per key, expiring once the bucket would be full again.
        ttl = await replicas[0].client.pttl(replicas[0].keys.key_rate(DIGEST_A))
        assert 0 < ttl <= 60_001
        assert await limit_keys(replicas[0]) == sorted(
            [replicas[0].keys.key_rate(DIGEST_A), replicas[0].keys.key_rate(key_digest(KEY_B))]
        )


class TestConcurrency:
    async def test_slots_are_taken_refused_and_freed(self, store_factory: StoreFactory) -> None:
        a, b = store_factory(seed=1), store_factory(seed=2)
        first = await key_limits.acquire(a, DIGEST_A, 0, 2, "ra:1")
        second = await key_limits.acquire(b, DIGEST_A, 0, 2, "rb:1")
        assert first.allowed and first.leased and first.member == "ra:1"
        assert second.allowed and second.in_flight == 2
        third = await key_limits.acquire(a, DIGEST_A, 0, 2, "ra:2")
        assert not third.allowed and third.limit == "concurrency" and not third.leased
        assert 0 < third.retry_after_s <= 1
        assert await key_limits.release(b, DIGEST_A, "ra:1")  # any replica may free it
        assert not await key_limits.release(a, DIGEST_A, "ra:1")  # idempotent
        again = await key_limits.acquire(a, DIGEST_A, 0, 2, "ra:2")
        assert again.allowed and again.in_flight == 2
        # A retried call with the same member keeps its one slot.
        retried = await key_limits.acquire(a, DIGEST_A, 0, 2, "ra:2")
        assert retried.allowed and retried.leased and retried.in_flight == 2
        assert not (await key_limits.acquire(b, DIGEST_A, 0, 2, "rb:2")).allowed
        # Only the concurrency state exists: no rate limit, no rate state.
        assert await limit_keys(a) == [a.keys.key_leases(DIGEST_A)]

    async def test_expired_leases_stop_counting(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        for i in range(2):
            decision = await key_limits.acquire(store, DIGEST_A, 0, 2, f"r:{i}", lease_ms=100)
            assert decision.allowed
        assert not (await key_limits.acquire(store, DIGEST_A, 0, 2, "r:x", lease_ms=100)).allowed
        await asyncio.sleep(0.25)  # a crashed replica's requests: their leases expire
        fresh = await key_limits.acquire(store, DIGEST_A, 0, 2, "r:2", lease_ms=100)
        assert fresh.allowed and fresh.in_flight == 1
        assert not await key_limits.release(store, DIGEST_A, "r:0")  # expired: frees nothing
        await asyncio.sleep(0.25)
        assert await limit_keys(store) == []  # the set expires with its last lease

    async def test_one_limit_refusing_counts_against_neither(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        held = await key_limits.acquire(store, DIGEST_A, 2, 1, "r:1")
        assert held.allowed and held.leased
        busy = await key_limits.acquire(store, DIGEST_A, 2, 1, "r:2")
        assert not busy.allowed and busy.limit == "concurrency"  # did not spend the rpm
        assert await key_limits.release(store, DIGEST_A, "r:1")
        second = await key_limits.acquire(store, DIGEST_A, 2, 1, "r:3")
        assert second.allowed  # the second request of the minute
        assert await key_limits.release(store, DIGEST_A, "r:3")
        over = await key_limits.acquire(store, DIGEST_A, 2, 1, "r:4")
        assert not over.allowed and over.limit == "rpm" and not over.leased
        assert await store.client.zcard(store.keys.key_leases(DIGEST_A)) == 0


class TestGatewayCheck:
    async def test_unlimited_keys_never_touch_redis_for_limits(
        self, store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = store_factory()
        await store.add_key("team-b", KEY_B)
        await store.refresh()
        calls: list[Any] = []
        real = store.run_script

        async def counting(script: Any, keys: list[str], args: list[Any]) -> Any:
            calls.append(script.name)
            return await real(script, keys, args)

        monkeypatch.setattr(store, "run_script", counting)
        for i in range(5):
            assert await key_limits.admit(store, key_digest(KEY_B), "r", f"q{i}") is None
        assert calls == [] and await limit_keys(store) == []

    async def test_limited_key_added_after_the_cache(self, store_factory: StoreFactory) -> None:
        gateway, ops = store_factory(seed=1), store_factory(seed=2)
        await gateway.refresh()
        await ops.add_key("team-a", KEY_A, rpm=1, concurrency=1)
        # The replica's cache predates the key: it re-reads the registry once.
        decision = await key_limits.admit(gateway, DIGEST_A, "r", "q1")
        assert decision is not None and decision.allowed and decision.leased
        assert key_limits.cached_limits(gateway, DIGEST_A) == (1, 1)
        refused = await key_limits.admit(gateway, DIGEST_A, "r", "q2")
        assert refused is not None and not refused.allowed
        await key_limits.dismiss(gateway, DIGEST_A, decision)
        assert await gateway.client.zcard(gateway.keys.key_leases(DIGEST_A)) == 0

    async def test_store_down_fails_open_and_warns_once(
        self,
        store_factory: StoreFactory,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        store = store_factory()
        await store.add_key("team-a", KEY_A, rpm=1, concurrency=1)
        await store.refresh()

        async def down(script: Any, keys: list[str], args: list[Any]) -> Any:
            raise StoreUnavailable("store unreachable: test")

        monkeypatch.setattr(store, "run_script", down)
        with caplog.at_level(logging.WARNING, logger="fleetgate.limits"):
            for i in range(3):
                assert await key_limits.admit(store, DIGEST_A, "r", f"q{i}") is None
            leased = key_limits.LimitDecision(allowed=True, leased=True, member="r:q:1")
            await key_limits.dismiss(store, DIGEST_A, leased)  # never raises
            monkeypatch.undo()
            back = await key_limits.admit(store, DIGEST_A, "r", "q9")
        assert back is not None and back.allowed
        warnings = [r.getMessage() for r in caplog.records]
        assert len([w for w in warnings if "not enforced" in w]) == 1
        assert any("enforced" in w and "again" in w for w in warnings)


# -- end to end: two replicas sharing a real Redis --------------------------------------


async def call(
    http: httpx.AsyncClient, gateway: Gateway, key: str | None, max_tokens: int = 1
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return await http.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [], "max_tokens": max_tokens},
        headers=headers,
    )


def assert_rate_limited(response: httpx.Response, code: str) -> int:
    """An OpenAI-shaped 429 with Retry-After; returns the seconds to wait."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("rate_limit_error", code)
    assert "Rate limit reached" in error["message"]
    seconds = int(response.headers["retry-after"])
    assert 1 <= seconds <= 60
    return seconds


async def test_key_over_its_limit_gets_429_from_either_replica(
    redis_url: str, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "20")
    procs.append(node)
    replicas = replicas_of(procs, redis_url, node)

    added = ops(redis_url, "keys", "add", "rated", "--key", KEY_A, "--rpm", "3")
    assert added.returncode == 0, added.stderr
    assert "rpm 3, concurrency -" in added.stdout
    added = ops(redis_url, "keys", "add", "single", "--key", KEY_B, "--concurrency", "1")
    assert added.returncode == 0, added.stderr
    listing = orjson.loads(ops(redis_url, "keys", "list", "--json").stdout)
    assert [(k["name"], k["rpm"], k["concurrency"]) for k in listing] == [
        ("rated", 3, 0),
        ("single", 0, 1),
    ]

    async with httpx.AsyncClient(timeout=30) as http:

        async def closed_everywhere() -> bool:
            return all([(await call(http, g, None)).status_code == 401 for g in replicas])

        assert await eventually(closed_everywhere, 5)  # every replica knows the keys

        # rpm 3: three requests spread over both replicas pass, the fourth is refused by both.
        for i in range(3):
            response = await call(http, replicas[i % 2], KEY_A)
            assert response.status_code == 200, response.text
        for gateway in replicas:
            assert_rate_limited(await call(http, gateway, KEY_A), "rate_limit_exceeded")
        assert (await call(http, replicas[0], KEY_B)).status_code == 200  # other keys pass

        # concurrency 1: a second request in flight is refused by the other replica ...
        held = asyncio.ensure_future(call(http, replicas[0], KEY_B, max_tokens=30))
        await asyncio.sleep(0.4)
        assert not held.done()
        busy = await call(http, replicas[1], KEY_B)
        assert assert_rate_limited(busy, "concurrency_limit_exceeded") == 1
        assert (await held).status_code == 200
        # ... and passes as soon as the first answer is back: its slot is freed before that.
        for gateway in (replicas[1], replicas[0]):
            assert (await call(http, gateway, KEY_B)).status_code == 200

        # Limits change on every replica without a restart: rpm 0 is unlimited.
        changed = ops(redis_url, "keys", "set", "rated", "--rpm", "0")
        assert changed.returncode == 0 and "changed" in changed.stdout, changed.stderr

        async def unlimited_everywhere() -> bool:
            return all([(await call(http, g, KEY_A)).status_code == 200 for g in replicas])

        assert await eventually(unlimited_everywhere, 5)
    again = ops(redis_url, "keys", "set", "rated", "--rpm", "0")
    assert again.returncode == 0 and "unchanged" in again.stdout
    missing = ops(redis_url, "keys", "set", "nobody", "--rpm", "1")
    assert missing.returncode == 1 and "nobody" in missing.stderr
    bad = ops(redis_url, "keys", "set", "rated", "--rpm", "-1")
    assert bad.returncode == 2 and "whole number" in bad.stderr
