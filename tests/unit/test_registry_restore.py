"""A store that lost the registry (emptied, restarted empty, behind after a fail-over): a cache
never trusts it less than itself; a replica's cache restores it once, with the epoch carried
over, never into a store that is not behind; other caches adopt what the store holds.
Run on the embedded store here and on a real redis-server by tests/e2e/test_state_on_redis.py.
"""

from __future__ import annotations

import asyncio

import pytest

from shared_state import NodeState, Registry, Store
from shared_state.registry import registry_fields
from shared_state.registry_cache import read_restore_record, restore_registry
from tests.support.store import StoreFactory

N1, N2, N3 = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"
KEY = "team-a-key-0123456789"


def fields_of(registry: Registry) -> dict[str, dict[str, str]]:
    return {n.id: registry_fields(n) for n in registry.nodes}


async def fill(store: Store) -> Registry:
    """Nodes with every registry setting, one drained, a client key with limits and admission
    settings."""
    await store.add_node(N1, ["m"], speed=2.0, weight=3.0, api_key="node-secret", max_inflight=4)
    await store.add_node(N2, ["m", "n"], role=3, insecure=True)
    await store.drain(N2)
    await store.add_key("team-a", KEY, rpm=600, concurrency=4, priority="high", share=2)
    return await store.registry()


async def replica(store_factory: StoreFactory, name: str) -> Store:
    store = store_factory()
    store.cache.restore_as(name)
    await store.refresh_latest()
    return store


class TestRegistryRestore:
    async def test_a_registry_read_holds_the_nodes_of_its_epoch(
        self, store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        reader, writer = store_factory(), store_factory()
        await writer.add_node(N1, ["m"])
        smembers = reader.client.smembers
        raced: list[str] = []

        async def then_a_node_is_added(key: str) -> object:
            members = await smembers(key)
            if not raced:  # another client registers a node right after the set was read
                raced.append(N2)
                await writer.add_node(N2, ["m"])
            return members

        monkeypatch.setattr(reader.client, "smembers", then_a_node_is_added)
        registry = await reader.registry()
        assert raced and registry.epoch == await writer.epoch()
        assert [n.id for n in registry.nodes] == [N1, N2]

    async def test_a_cache_that_does_not_restore_adopts_a_store_behind_it(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await fill(store)
        await store.refresh_latest()
        await store.client.flushall()
        await store.add_node(N3, ["m"])  # epoch 1, far below the cache's
        view = await store.refresh_latest()
        assert sorted(view.by_id) == [N3] and view.candidates("m") == [N3]

    async def test_an_emptied_store_is_restored_once_with_the_epoch_carried_over(
        self, store_factory: StoreFactory
    ) -> None:
        a, b = await replica(store_factory, "r1"), await replica(store_factory, "r2")
        before = await fill(a)
        await asyncio.gather(a.refresh_latest(), b.refresh_latest())
        await a.client.flushall()
        views = await asyncio.gather(a.refresh_latest(), b.refresh_latest())
        assert a.cache.restores + b.cache.restores == 1
        after = await a.registry()
        assert after.epoch == before.epoch + 1
        assert fields_of(after) == fields_of(before)
        assert after.nodes[1].state is NodeState.DRAINING
        assert after.key_entries == before.key_entries and after.keys_required
        assert after.key_limits == before.key_limits
        assert after.key_admission == before.key_admission != {}
        assert after.nodes[0].max_inflight == 4
        assert {(v.epoch, v.generation) for v in views} == {(after.epoch, after.generation)}
        record = await read_restore_record(a)
        assert record is not None and record.by in {"r1", "r2"}
        assert (record.found_epoch, record.epoch, record.nodes, record.keys) == (
            0,
            after.epoch,
            2,
            1,
        )
        assert a.cache.loss is None and b.cache.loss is None
        assert (a.cache.last_loss or b.cache.last_loss) is not None

    async def test_a_pick_on_an_emptied_store_restores_it_and_succeeds(
        self, store_factory: StoreFactory
    ) -> None:
        a = await replica(store_factory, "r1")
        await fill(a)
        await a.refresh_latest()
        await a.client.flushall()
        pick = await a.pick("m", strategy="least_connections", replica="r1", request_id="q1")
        assert pick is not None and pick.node.id == N1 and a.cache.restores == 1
        assert await a.in_flight(N1) == 1

    async def test_a_removed_node_does_not_come_back(self, store_factory: StoreFactory) -> None:
        a, b = await replica(store_factory, "r1"), await replica(store_factory, "r2")
        await fill(a)
        await b.refresh_latest()
        await a.remove_node(N2)
        await b.refresh_latest()
        await a.client.flushall()
        await b.refresh_latest()
        assert b.cache.restores == 1
        assert [n.id for n in (await a.registry()).nodes] == [N1]

    async def test_a_store_not_behind_is_never_written(self, store_factory: StoreFactory) -> None:
        a = await replica(store_factory, "r1")
        old = await fill(a)
        await a.refresh_latest()
        await a.remove_node(N1)
        now = await a.registry()
        result = await restore_registry(a, old, "r1")
        assert result.status == "current" and result.epoch == now.epoch
        assert await a.registry() == now

    async def test_nodes_written_after_the_reset_are_kept(
        self, store_factory: StoreFactory
    ) -> None:
        a = await replica(store_factory, "r1")
        before = await fill(a)
        await a.refresh_latest()
        await a.client.flushall()
        await a.add_node(N1, ["other"])  # re-registered after the reset: newer than the cache
        await a.add_node(N3, ["m"])
        view = await a.refresh_latest()
        assert a.cache.restores == 1 and view.epoch > before.epoch
        assert sorted(view.by_id) == [N1, N2, N3]
        assert view.by_id[N1].models == ("other",)

    async def test_a_reset_store_written_past_the_cached_epoch_is_still_told(
        self, store_factory: StoreFactory
    ) -> None:
        a = await replica(store_factory, "r1")
        before = await fill(a)
        await a.refresh_latest()
        assert (await a.registry()).generation  # the first read gave the registry one
        await a.client.flushall()
        await a.add_node(N3, ["m"])
        for _ in range(before.epoch + 1):  # the epoch overtakes the cache's
            await a.set_state(N3, NodeState.ACTIVE)
        assert (await a.epoch()) > before.epoch
        view = await a.refresh_latest()
        assert a.cache.restores == 1 and sorted(view.by_id) == [N1, N2, N3]
