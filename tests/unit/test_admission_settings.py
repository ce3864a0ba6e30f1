"""Fleet-wide admission settings as the store keeps them: a node's capacity (``max_inflight``)
in its hash, and a client key's priority, priority cap and fair share in its record, read
into the registry only for the keys that have settings other than the defaults (what a
replica does with them is the request path's). The ops CLI and ``/nodes/*`` setting them:
tests/e2e/test_admission_settings.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from shared_state import (
    InvalidInput,
    KeyAdmission,
    Node,
    Priority,
    Store,
    UnknownKey,
    key_digest,
)
from shared_state.key_records import api_key_record, key_admission
from shared_state.registry import registry_fields
from tests.support.store import StoreFactory

A = "http://127.0.0.1:9001"
KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
DIGEST_A = key_digest(KEY_A)


async def record(store: Store, digest: str) -> dict[str, Any]:
    """The stored JSON record of a key."""
    raw = await store.client.hget(store.keys.api_keys, digest)
    assert raw is not None
    found: dict[str, Any] = orjson.loads(raw)
    return found


class TestNodeCapacity:
    async def test_set_changed_and_cleared(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        node, _ = await store.add_node(A, ["m"], max_inflight=4)
        assert node.max_inflight == 4 and registry_fields(node)["max_inflight"] == "4"
        assert (await store.update_node(A, max_inflight=8)).max_inflight == 8
        assert (await store.update_node(A, weight=2.0)).max_inflight == 8  # others kept
        epoch = await store.epoch()
        cleared = await store.update_node(A, max_inflight=0)  # unlimited again
        assert cleared.max_inflight is None and "max_inflight" not in registry_fields(cleared)
        assert not await store.hash_has(store.keys.node(A), "max_inflight")
        assert await store.epoch() == epoch + 1  # replicas learn it
        unlimited, _ = await store.add_node("http://127.0.0.1:9002", ["m"])
        assert unlimited.max_inflight is None

    @pytest.mark.parametrize("value", [0, -1, 1_000_001, True, 2.5, "3"])
    async def test_bad_capacity_is_refused_and_changes_nothing(
        self, store_factory: StoreFactory, value: object
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"], max_inflight=4)
        before = await store.registry()
        # Untyped on purpose: the values are of the wrong types the store must refuse.
        add_node: Callable[..., Awaitable[tuple[Node, bool]]] = store.add_node
        update_node: Callable[..., Awaitable[Node]] = store.update_node
        with pytest.raises(InvalidInput, match="max_inflight must be an integer from 1 to"):
            await add_node(A, ["m"], max_inflight=value)
        if value != 0:  # 0 clears it on a known node
            with pytest.raises(InvalidInput, match="max_inflight"):
                await update_node(A, max_inflight=value)
        assert await store.registry() == before


class TestKeyAdmission:
    async def test_settings_live_with_the_key(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        key, created = await store.add_key(
            "team-a", KEY_A, priority="high", max_priority=Priority.HIGH, share=3
        )
        assert created and (key.priority, key.max_priority, key.share) == (
            Priority.HIGH,
            Priority.HIGH,
            3,
        )
        plain, _ = await store.add_key("team-b", KEY_B)
        assert (plain.priority, plain.max_priority, plain.share) == (Priority.NORMAL, None, 1)
        registry = await store.registry()
        # Keys with the defaults are absent: they cost the request path nothing.
        assert registry.key_admission == {DIGEST_A: KeyAdmission(Priority.HIGH, Priority.HIGH, 3)}
        assert registry.key_limits == {}  # admission settings are no limits

        epoch = await store.epoch()
        again, created = await store.add_key("team-a", KEY_A, priority="high", share=3)
        assert not created and again == key and await store.epoch() == epoch  # idempotent
        again, created = await store.add_key("team-a", KEY_A)  # nothing given: kept
        assert again == key and await store.epoch() == epoch
        capped, did = await store.set_key_limits("team-a", priority="LOW", max_priority="normal")
        assert did and (capped.priority, capped.max_priority, capped.share) == (
            Priority.LOW,
            Priority.NORMAL,
            3,
        )
        assert await store.epoch() == epoch + 1
        same, did = await store.set_key_limits("team-a", priority=Priority.LOW, share=3)
        assert not did and same == capped and await store.epoch() == epoch + 1

    async def test_defaults_are_stored_as_absent(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_key("team-a", KEY_A, rpm=5, priority="low", max_priority="high", share=7)
        assert (await record(store, DIGEST_A)).keys() == {
            "name",
            "created_ms",
            "rpm",
            "priority",
            "max_priority",
            "share",
        }
        await store.set_key_limits("team-a", max_priority="any")
        assert (await store.registry()).key_admission == {
            DIGEST_A: KeyAdmission(Priority.LOW, None, 7)
        }
        key, did = await store.set_key_limits("team-a", priority="normal", share=1)
        assert did and (key.priority, key.max_priority, key.share, key.rpm) == (
            Priority.NORMAL,
            None,
            1,
            5,
        )
        assert (await record(store, DIGEST_A)).keys() == {"name", "created_ms", "rpm"}
        assert (await store.registry()).key_admission == {}

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"priority": "urgent"}, "priority must be high, normal or low, not 'urgent'"),
            ({"priority": "any"}, "priority must be high, normal or low"),
            ({"priority": 0}, "priority must be high, normal or low"),
            ({"max_priority": "top"}, "max_priority must be high, normal, low or any"),
            ({"share": 0}, "share must be a whole number from 1 to 1000"),
            ({"share": 1001}, "share must be a whole number from 1 to 1000"),
            ({"share": True}, "share must be a whole number"),
            ({"share": 2.0}, "share must be a whole number"),
        ],
    )
    async def test_bad_settings_are_refused_and_change_nothing(
        self, store_factory: StoreFactory, kwargs: dict[str, object], message: str
    ) -> None:
        store = store_factory()
        await store.add_key("team-a", KEY_A, priority="high")
        before = await store.registry()
        # Untyped on purpose: the values are of the wrong types the store must refuse.
        add_key: Callable[..., Awaitable[object]] = store.add_key
        set_key: Callable[..., Awaitable[object]] = store.set_key_limits
        with pytest.raises(InvalidInput, match=message):
            await add_key("team-b", KEY_B, **kwargs)
        with pytest.raises(InvalidInput, match=message):
            await set_key("team-a", **kwargs)
        assert await store.registry() == before

    async def test_unknown_key(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        with pytest.raises(UnknownKey):
            await store.set_key_limits("nobody", priority="high")
        assert await store.list_keys() == []


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"name": "a", "created_ms": 1}, None),
        ({"priority": "normal", "share": 1}, None),
        ({"priority": "low"}, KeyAdmission(Priority.LOW)),
        ({"max_priority": "normal", "share": 5}, KeyAdmission(Priority.NORMAL, Priority.NORMAL, 5)),
        ({"priority": "high", "max_priority": "low"}, KeyAdmission(Priority.HIGH, Priority.LOW)),
        # Malformed records (written by hand, by a later version) read as the defaults.
        ({"priority": 0, "max_priority": "top", "share": "9"}, None),
        ({"priority": "HIGH", "share": 0}, None),
        ({"share": 1001}, None),
        ({"share": True}, None),
        ({"share": 2.5, "priority": "low"}, KeyAdmission(Priority.LOW)),
        (None, None),
        ([], None),
        ("priority", None),
    ],
)
def test_a_record_is_read_leniently(meta: object, expected: KeyAdmission | None) -> None:
    assert key_admission(meta) == expected


def test_the_public_view_shows_the_settings() -> None:
    meta = {"name": "a", "created_ms": 1, "priority": "low", "max_priority": "x", "share": 2}
    key = api_key_record(DIGEST_A, meta)
    assert (key.priority, key.max_priority, key.share, key.rpm) == (Priority.LOW, None, 2, 0)
