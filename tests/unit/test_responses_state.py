"""The stored-response map on the embedded store: recorded, found, forgotten, bounded in age
and in count. The same tests run against a real redis-server in tests/e2e/test_state_on_redis.py."""

from __future__ import annotations

import asyncio

from shared_state import responses
from shared_state.responses import Holder, ResponseSettings
from tests.support.store import StoreFactory

NODE_A, NODE_B = "http://127.0.0.1:9701", "http://127.0.0.1:9702"


class TestResponseMap:
    async def test_recorded_found_and_forgotten(self, store_factory: StoreFactory) -> None:
        store, other = store_factory(), store_factory(seed=2)
        settings = ResponseSettings()
        assert await responses.record(store, "resp_1", NODE_A, "m", settings) == 1
        await responses.record(store, "resp_2", NODE_B, "m2", settings)
        # Another replica finds it.
        assert await responses.holder(other, "resp_1", settings) == Holder(NODE_A, "m")
        assert await responses.holder(other, "resp_2", settings) == Holder(NODE_B, "m2")
        assert await responses.holder(other, "resp_3", settings) is None
        assert await responses.forget(other, "resp_1")
        assert not await responses.forget(other, "resp_1")
        assert await responses.holder(store, "resp_1", settings) is None

    async def test_bounded_in_age(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        short = ResponseSettings(lifetime_ms=150)
        await responses.record(store, "old", NODE_A, "m", short)
        await asyncio.sleep(0.2)
        assert await responses.holder(store, "old", short) is None  # expired, though still held
        await responses.record(store, "new", NODE_A, "m", short)  # drops what expired
        assert await store.client.hexists(store.keys.responses, "old") == 0
        assert await responses.holder(store, "new", short) == Holder(NODE_A, "m")

    async def test_bounded_in_count_oldest_first(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        few = ResponseSettings(max_entries=3)
        for i in range(5):
            kept = await responses.record(store, f"r{i}", NODE_A, "m", few)
            assert kept == min(i + 1, 3)
            await asyncio.sleep(0.002)  # distinct ms: the oldest is unambiguous
        found = [await responses.holder(store, f"r{i}", few) is not None for i in range(5)]
        assert found == [False, False, True, True, True]
        assert await store.client.hlen(store.keys.responses) == 3
