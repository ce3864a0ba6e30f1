"""Per-key limits on the embedded store: requests per minute and concurrency of client API keys,
stored with the key, shared by replicas, and checked by a gateway replica (which never touches
the store for an unlimited key and fails open when the store is down). The same tests run
against a real redis-server in tests/e2e/test_state_on_redis.py; a key over its limit refused
by real replicas: tests/e2e/test_limits.py."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from shared_state import InvalidInput, Store, StoreUnavailable, UnknownKey, key_digest
from shared_state import limits as key_limits
from tests.support.store import StoreFactory

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
