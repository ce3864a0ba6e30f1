"""The health-checker's shared state on the embedded store: one fenced leader, fall and rise
with reasons and events, deregistration, recorded load and the sweep of expired leases. The same
tests run against a real redis-server in tests/e2e/test_state_on_redis.py; the checker itself
(probe rounds, fail-over between processes) is in tests/e2e/test_health_checker.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from shared_state import Fenced, HealthLedger, NodeState, ProbeResult, StoreSettings
from shared_state.model import HealthReport
from tests.support.store import StoreFactory

A, B = "http://127.0.0.1:9301", "http://127.0.0.1:9302"
OK, FAIL = ProbeResult.OK, ProbeResult.FAIL


async def report(
    ledger: HealthLedger,
    token: int,
    node: str,
    result: ProbeResult,
    *,
    fall: int = 3,
    rise: int = 2,
    deregister_after_ms: int = 0,
    reason: str = "",
    models: Iterable[str] | None = None,
    kv_usage: float | None = None,
    running: int | None = None,
    waiting: int | None = None,
) -> HealthReport:
    """A probe report with the checker's usual fall and rise unless the test says."""
    return await ledger.report(
        token,
        node,
        result,
        fall=fall,
        rise=rise,
        deregister_after_ms=deregister_after_ms,
        reason=reason,
        models=models,
        kv_usage=kv_usage,
        running=running,
        waiting=waiting,
    )


class TestLedger:
    async def test_one_leader_and_takeover_fences_the_old_one(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        one, two = HealthLedger(store, "one"), HealthLedger(store, "two")
        token1, holder = await one.lead(300)
        assert token1 > 0 and holder == "one"
        assert await two.lead(300) == (0, "one")
        assert (await one.lead(300))[0] == token1  # keeping the lease keeps the token
        await asyncio.sleep(0.45)  # "one" paused past its lease
        token2, holder = await two.lead(300)
        assert token2 > token1 and holder == "two"
        before = await store.get_node(A)
        for _ in range(5):
            with pytest.raises(Fenced):
                await report(one, token1, A, FAIL, fall=1)
        with pytest.raises(Fenced):
            await one.sweep(token1, [A], 1000)
        assert await store.get_node(A) == before
        assert (await report(two, token2, A, OK)).status == "ok"
        await two.resign()
        token3, _ = await one.lead(300)
        assert token3 > token2

    async def test_fall_and_rise_with_reasons_and_events(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        ledger = HealthLedger(store, "c")
        token, _ = await ledger.lead(10_000)
        epoch = await store.epoch()
        for result in (FAIL, FAIL, OK, FAIL, FAIL):  # never 3 failures in a row
            assert not (await report(ledger, token, A, result, reason="GET /health 503")).changed
        assert (await store.get_node(A)).state is NodeState.ACTIVE
        assert await store.epoch() == epoch
        moved = await report(ledger, token, A, FAIL, reason="GET /health 503")
        assert moved.changed and moved.state == "unhealthy"
        node = await store.get_node(A)
        assert node.state is NodeState.UNHEALTHY and node.state_reason == "GET /health 503"
        assert await store.epoch() == epoch + 1
        for result in (OK, FAIL, OK):  # rise needs 2 in a row
            assert (await report(ledger, token, A, result)).state == "unhealthy"
        assert (await report(ledger, token, A, OK)).state == "active"
        events = await ledger.events()
        assert [(e.from_state, e.to_state) for e in events] == [
            ("unhealthy", "active"),
            ("active", "unhealthy"),
        ]
        assert events[1].reason == "GET /health 503" and events[0].by == "c"

    async def test_draining_is_left_to_operators(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        await store.drain(A)
        ledger = HealthLedger(store, "c")
        token, _ = await ledger.lead(10_000)
        for _ in range(5):
            await report(ledger, token, A, FAIL, fall=1)
        assert (await store.get_node(A)).state is NodeState.DRAINING

    async def test_deregistered_after_deadline_with_leases_and_history(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        await store.add_node(B, ["m"])
        p = await store.pick("m", strategy="random", replica="r", request_id="1", exclude=[B])
        assert p is not None
        ledger = HealthLedger(store, "c")
        token, _ = await ledger.lead(10_000)
        assert (await report(ledger, token, A, FAIL, fall=1, deregister_after_ms=300)).changed
        assert (await report(ledger, token, A, FAIL, deregister_after_ms=300)).status == "ok"
        await asyncio.sleep(0.35)
        gone = await report(ledger, token, A, FAIL, deregister_after_ms=300)
        assert gone.status == "removed"
        assert [n.id for n in (await store.registry()).nodes] == [B]
        assert await store.in_flight(A) == 0
        assert await store.client.exists(store.keys.latencies(A), store.keys.node(A)) == 0
        assert (await report(ledger, token, A, OK)).status == "gone"
        # A node that comes back can simply register again.
        _, created = await store.add_node(A, ["m"])
        assert created

    async def test_models_and_load_are_recorded(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        ledger = HealthLedger(store, "c")
        token, _ = await ledger.lead(10_000)
        epoch = await store.epoch()
        await report(ledger, token, A, OK, models=["m", "m2"], kv_usage=0.4, running=3, waiting=1)
        node = await store.get_node(A)
        assert node.models == ("m", "m2") and await store.epoch() == epoch + 1
        assert node.kv_usage == 0.4 and node.kv_running == 3 and node.kv_waiting == 1
        assert node.kv_ts_ms and node.last_probe_ms

    async def test_sweep_prunes_expired_leases_and_lists_live_replicas(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory(StoreSettings(lease_ms=200))
        await store.add_node(A, ["m"])
        held = []
        for i in range(3):
            p = await store.pick("m", strategy="random", replica="gw1", request_id=str(i))
            assert p is not None
            held.append(p.lease)
        assert await store.renew("gw1", held) == 3
        await asyncio.sleep(0.3)
        ledger = HealthLedger(store, "c")
        token, _ = await ledger.lead(10_000)
        sweep = await ledger.sweep(token, [A], 60_000)
        assert sweep.pruned_leases == 3 and list(sweep.live_replicas) == ["gw1"]
        assert await store.client.zcard(store.keys.leases(A)) == 0
        assert (await ledger.sweep(token, [A], 100)).live_replicas == {}
