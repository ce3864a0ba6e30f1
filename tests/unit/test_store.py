"""The shared state's Store on the embedded store: registering nodes, every routing strategy,
leases, ejection, weights and session affinity, and the API key store. The same tests run
against a real redis-server in tests/e2e/test_state_on_redis.py."""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import random
import statistics
from collections.abc import Awaitable, Callable, Iterable

import pytest

from shared_state import (
    InvalidInput,
    Lease,
    Node,
    NodeState,
    Outcome,
    Role,
    Store,
    StoreSettings,
    Strategy,
    UnknownKey,
    UnknownNode,
    UnknownStrategy,
    key_digest,
)
from tests.support.store import StoreFactory

A, B, C, D = (f"http://127.0.0.1:{p}" for p in (9001, 9002, 9003, 9004))


async def redis_now_ms(store: Store) -> int:
    sec, usec = await store.client.time()
    return int(sec) * 1000 + int(usec) // 1000


async def hold(store: Store, node: str, count: int, tag: str = "held") -> None:
    """Put ``count`` live leases on ``node`` the way another replica would."""
    deadline = await redis_now_ms(store) + 60_000
    await store.client.zadd(store.keys.leases(node), {f"{tag}:{i}": deadline for i in range(count)})


async def picks(
    store: Store,
    n: int,
    strategy: Strategy,
    model: str = "m",
    *,
    role: int = 0,
    exclude: Iterable[str] = (),
) -> list[str]:
    """``n`` sequential pick+release pairs; returns the winners."""
    out = []
    for i in range(n):
        p = await store.pick(
            model, strategy=strategy, replica="r", request_id=f"q{i}", role=role, exclude=exclude
        )
        assert p is not None
        out.append(p.node.id)
        await store.release(p.lease, Outcome.NEUTRAL, 0.0)
    return out


class TestRegistry:
    async def test_add_update_drain_remove_bump_epoch(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        node, created = await store.add_node(A + "/", ["m"], speed=10)
        assert created and node.id == A and node.models == ("m",) and node.speed == 10
        e1 = await store.epoch()
        again, created = await store.add_node(A, ["m", "n"], weight=2)
        assert not created and again.models == ("m", "n") and again.weight == 2
        e2 = await store.epoch()
        drained = await store.drain(A)
        assert drained.state is NodeState.DRAINING and drained.state_reason
        e3 = await store.epoch()
        await store.remove_node(A)
        e4 = await store.epoch()
        assert e1 < e2 < e3 < e4
        assert (await store.registry()).nodes == ()

    async def test_url_is_normalized_into_the_id(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        node, _ = await store.add_node("HTTP://LocalHost:8000/", ["m"])
        assert node.id == "http://localhost:8000"
        _, created = await store.add_node("http://localhost:8000", ["m"])
        assert not created

    async def test_re_registration_keeps_runtime_history(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        p = await store.pick("m", strategy="least_connections", replica="r", request_id="1")
        assert p is not None
        await store.release(p.lease, Outcome.OK, 0.2)
        node, _ = await store.add_node(A, ["m"])
        assert node.ok_total == 1
        status = await store.status()
        assert status[0].latencies_s == (0.2,)

    async def test_samples_are_per_output_token_and_unit_of_load(
        self, store_factory: StoreFactory
    ) -> None:
        """A good answer is recorded per output token and per request in flight at its pick,
        so a node that happened to get long answers, or a busy moment, does not look slow; a
        failure is recorded whole."""
        store = store_factory()
        await store.add_node(A, ["m"])
        first = await store.pick("m", strategy="least_connections", replica="r", request_id="1")
        second = await store.pick("m", strategy="least_connections", replica="r", request_id="2")
        assert first is not None and second is not None
        assert (first.lease.load, second.lease.load) == (1, 2)
        await store.release(first.lease, Outcome.OK, 0.8, tokens=40)  # 20 ms a token
        await store.release(second.lease, Outcome.OK, 0.8, tokens=10)  # 80 / 2 requests
        third = await store.pick("m", strategy="least_connections", replica="r", request_id="3")
        assert third is not None
        await store.release(third.lease, Outcome.OK, 0.05)  # no token count: whole latency
        fourth = await store.pick("m", strategy="least_connections", replica="r", request_id="4")
        assert fourth is not None
        await store.release(fourth.lease, Outcome.FAIL, 0.5, tokens=10)
        (status,) = await store.status()
        assert status.latencies_s == pytest.approx((10.0, 0.05, 0.04, 0.02))  # newest first

    @pytest.mark.parametrize(
        ("url", "models", "kwargs"),
        [
            ("not a url", ["m"], {}),
            ("ftp://host:1", ["m"], {}),
            ("http://", ["m"], {}),
            ("http://h:99999", ["m"], {}),
            ("http://user:pw@h:1", ["m"], {}),
            (A, [], {}),
            (A, [""], {}),
            (A, ["a\nb"], {}),
            (A, ["m"], {"role": 7}),
            (A, ["m"], {"speed": -1}),
            (A, ["m"], {"weight": float("nan")}),
            (42, ["m"], {}),
        ],
    )
    async def test_bad_input_is_typed_and_changes_nothing(
        self, store_factory: StoreFactory, url: object, models: list[str], kwargs: dict[str, object]
    ) -> None:
        store = store_factory()
        await store.add_node(B, ["m"])
        before = await store.registry()
        # Untyped on purpose: the values are of the wrong types the store must refuse.
        add_node: Callable[..., Awaitable[tuple[Node, bool]]] = store.add_node
        with pytest.raises(InvalidInput):
            await add_node(url, models, **kwargs)
        assert await store.registry() == before

    async def test_unknown_node_and_strategy(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        before = await store.registry()
        with pytest.raises(UnknownNode):
            await store.remove_node(B)
        with pytest.raises(UnknownNode):
            await store.update_node(B, weight=3)
        with pytest.raises(UnknownNode):
            await store.set_state(B, NodeState.UNHEALTHY)
        with pytest.raises(UnknownStrategy):
            await store.pick("m", strategy="fastest", replica="r", request_id="1")
        with pytest.raises(InvalidInput):
            await store.pick("", strategy="random", replica="r", request_id="1")
        assert await store.registry() == before
        assert await store.in_flight(A) == 0

    async def test_replicas_see_registry_changes_through_the_epoch(
        self, store_factory: StoreFactory
    ) -> None:
        one, two = store_factory(seed=1), store_factory(seed=2)
        await one.add_node(A, ["m"])
        assert await two.pick("m", strategy="random", replica="r2", request_id="1") is not None
        await one.add_node(B, ["other"])
        # two's cache predates B; the pick's epoch tells it to refresh, and it then finds B.
        got = await two.pick("other", strategy="random", replica="r2", request_id="2")
        assert got is not None and got.node.id == B


class TestStrategies:
    async def test_min_expected_latency_weighs_in_flight_by_speed(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"], speed=10)
        await store.add_node(B, ["m"], speed=30)
        assert await picks(store, 5, Strategy.MIN_EXPECTED_LATENCY) == [B] * 5
        await hold(store, B, 3)  # (3+1)/30 > (0+1)/10
        assert await picks(store, 5, Strategy.MIN_EXPECTED_LATENCY) == [A] * 5

    async def test_min_expected_latency_without_speeds_is_least_in_flight(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        for url in (A, B, C):
            await store.add_node(url, ["m"])
        await hold(store, A, 2)
        await hold(store, B, 1)
        assert set(await picks(store, 20, Strategy.MIN_EXPECTED_LATENCY)) == {C}

    async def test_ties_are_broken_at_random(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"], speed=5)
        await store.add_node(B, ["m"], speed=5)
        counts = collections.Counter(await picks(store, 200, Strategy.MIN_EXPECTED_LATENCY))
        assert counts[A] > 60 and counts[B] > 60

    async def test_least_connections(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        for url in (A, B, C):
            await store.add_node(url, ["m"], speed=100 if url == A else 1)
        await hold(store, A, 1)
        # Speed does not matter to least_connections.
        assert set(await picks(store, 20, Strategy.LEAST_CONNECTIONS)) == {B, C}

    async def test_random_is_weighted_by_speed_and_missing_speed_counts_as_mean(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"], speed=2)
        await store.add_node(B, ["m"])  # counts as 3, the mean of 2 and 4
        await store.add_node(C, ["m"], speed=4)
        n = 1800
        counts = collections.Counter(await picks(store, n, Strategy.RANDOM))
        for url, share in ((A, 2 / 9), (B, 3 / 9), (C, 4 / 9)):
            sd = math.sqrt(n * share * (1 - share))
            assert abs(counts[url] - n * share) < 4 * sd, counts

    async def test_random_weight_multiplies_speed(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"], weight=1)
        await store.add_node(B, ["m"], weight=3)
        counts = collections.Counter(await picks(store, 800, Strategy.RANDOM))
        assert 500 < counts[B] < 700, counts

    async def test_round_robin_shares_one_cursor_across_replicas(
        self, store_factory: StoreFactory
    ) -> None:
        one, two = store_factory(seed=1), store_factory(seed=2)
        for url in (A, B, C):
            await one.add_node(url, ["m"])
        order = []
        for i in range(9):
            store = one if i % 2 else two
            p = await store.pick(
                "m", strategy="round_robin", replica=f"r{i % 2}", request_id=str(i)
            )
            assert p is not None
            order.append(p.node.id)
        assert collections.Counter(order) == {A: 3, B: 3, C: 3}
        # Consecutive picks never repeat a node: the cursor is shared, not per replica.
        assert all(x != y for x, y in itertools.pairwise(order))

    async def _latencies(
        self, store: Store, node: str, values: list[float], ok: bool = True
    ) -> None:
        outcome = Outcome.OK if ok else Outcome.FAIL
        for i, v in enumerate(values):
            p = await store.pick(
                "m",
                strategy="least_connections",
                replica="seed",
                request_id=f"{node}{i}",
                exclude=[n for n in (A, B, C, D) if n != node],
            )
            assert p is not None and p.node.id == node
            await store.release(p.lease, outcome, v)

    async def test_min_observed_latency_prefers_fast_history(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory(StoreSettings(explore=0.0))
        for url in (A, B, C):
            await store.add_node(url, ["m"])
        await self._latencies(store, A, [0.1] * 5)
        await self._latencies(store, B, [0.3] * 5)
        await self._latencies(store, C, [0.5] * 5)
        # Idle fleet: LMDeploy's meaning, the lowest mean wins.
        assert set(await picks(store, 50, Strategy.MIN_OBSERVED_LATENCY)) == {A}
        # Requests in flight anywhere in the fleet scale the mean: with 2 on A (0.1 x 3 = 0.3)
        # A and B tie; with 5 on A (0.6) B wins; C (0.5) only once B has one in flight too.
        await hold(store, A, 2)
        assert set(await picks(store, 60, Strategy.MIN_OBSERVED_LATENCY)) == {A, B}
        await hold(store, A, 5, tag="more")
        assert set(await picks(store, 20, Strategy.MIN_OBSERVED_LATENCY)) == {B}
        await hold(store, B, 1)
        assert set(await picks(store, 20, Strategy.MIN_OBSERVED_LATENCY)) == {C}

    async def test_min_observed_latency_new_node_is_tried_not_starved(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory(StoreSettings(explore=0.0))
        for url in (A, B, C):
            await store.add_node(url, ["m"])
        await self._latencies(store, A, [0.1] * 5)
        await self._latencies(store, B, [0.2] * 5)
        await self._latencies(store, C, [0.3] * 5)
        await store.add_node(D, ["m"])  # no history: prior = 0.1, the best mean of the others
        counts = collections.Counter(await picks(store, 300, Strategy.MIN_OBSERVED_LATENCY))
        assert set(counts) == {A, D} and 0.3 < counts[D] / 300 < 0.7, counts
        # Its first answers give it a history of its own: a slow one stops being picked.
        await self._latencies(store, D, [0.4])
        assert set(await picks(store, 50, Strategy.MIN_OBSERVED_LATENCY)) == {A}

    async def test_min_observed_latency_cold_start_spreads(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        for url in (A, B, C):
            await store.add_node(url, ["m"])
        counts = collections.Counter(await picks(store, 300, Strategy.MIN_OBSERVED_LATENCY))
        assert min(counts[u] for u in (A, B, C)) > 50, counts

    @pytest.mark.parametrize("explore", [0.0, 0.02])
    async def test_failing_node_does_not_attract_traffic(
        self, store_factory: StoreFactory, explore: float
    ) -> None:
        # LMDeploy's black hole: a node that fails fast looks fast. Failures count as slow.
        settings = StoreSettings(explore=explore, eject_threshold=1000)
        store = store_factory(settings)
        for url in (A, B, C):
            await store.add_node(url, ["m"])
        await self._latencies(store, A, [0.4] * 5)
        await self._latencies(store, B, [0.5] * 5)
        await self._latencies(store, C, [0.001] * 5, ok=False)
        counts = collections.Counter(await picks(store, 300, Strategy.MIN_OBSERVED_LATENCY))
        assert counts[C] <= 300 * explore, counts

    async def test_min_cache_usage_uses_fresh_scrapes_then_falls_back(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"], speed=1)
        await store.add_node(B, ["m"], speed=100)
        now = await redis_now_ms(store)
        await store.client.hset(
            store.keys.node(A), mapping={"kv_usage": 0.1, "kv_running": 1, "kv_ts": now}
        )
        await store.client.hset(
            store.keys.node(B), mapping={"kv_usage": 0.8, "kv_running": 8, "kv_ts": now}
        )
        assert set(await picks(store, 5, Strategy.MIN_CACHE_USAGE)) == {A}
        # A's reserved requests add its per-request share (0.1) until it passes B.
        await hold(store, A, 9)
        assert set(await picks(store, 5, Strategy.MIN_CACHE_USAGE)) == {B}
        # Stale scrapes: the strategy falls back to min_expected_latency (B is 100x faster).
        await store.client.hset(store.keys.node(A), "kv_ts", now - 60_000)
        await store.client.delete(store.keys.leases(A))
        assert set(await picks(store, 5, Strategy.MIN_CACHE_USAGE)) == {B}


class TestFiltering:
    async def test_model_role_and_state(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"], role=Role.HYBRID)
        await store.add_node(B, ["m"], role=Role.PREFILL)
        await store.add_node(C, ["m"], role=Role.DECODE)
        await store.add_node(D, ["other"])
        assert set(await picks(store, 30, Strategy.RANDOM)) == {A, B, C}
        assert set(await picks(store, 10, Strategy.RANDOM, role=Role.PREFILL)) == {B}
        assert set(await picks(store, 10, Strategy.RANDOM, role=Role.DECODE)) == {C}
        assert await store.pick("nope", strategy="random", replica="r", request_id="x") is None
        await store.drain(A)
        await store.set_state(B, NodeState.UNHEALTHY, "probe failed")
        assert set(await picks(store, 20, Strategy.RANDOM)) == {C}
        await store.set_state(B, NodeState.ACTIVE, "probe passed")
        assert set(await picks(store, 30, Strategy.RANDOM)) == {B, C}

    async def test_stale_cache_cannot_route_to_a_drained_node(
        self, store_factory: StoreFactory
    ) -> None:
        one, two = store_factory(seed=1), store_factory(seed=2)
        await one.add_node(A, ["m"])
        await one.add_node(B, ["m"])
        await two.refresh()
        await one.drain(A)  # two's cached view still says A is active
        assert set(await picks(two, 20, Strategy.RANDOM)) == {B}

    async def test_exclude_skips_tried_nodes(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        await store.add_node(B, ["m"])
        assert set(await picks(store, 10, Strategy.RANDOM, exclude=[A])) == {B}
        assert (
            await store.pick("m", strategy="random", replica="r", request_id="x", exclude=[A, B])
            is None
        )


class TestLeases:
    async def test_same_request_id_twice_gives_one_lease(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        for url in (A, B, C):
            await store.add_node(url, ["m"])
        first = await store.pick("m", strategy="random", replica="r", request_id="q")
        second = await store.pick("m", strategy="random", replica="r", request_id="q", seed=7)
        assert first is not None and second is not None
        assert second.node.id == first.node.id and second.reused and not first.reused
        assert sum([await store.in_flight(u) for u in (A, B, C)]) == 1
        assert (await store.release(first.lease, Outcome.OK, 0.1)).released
        again = await store.release(second.lease, Outcome.OK, 0.1)
        assert not again.released
        assert sum([await store.in_flight(u) for u in (A, B, C)]) == 0
        assert [s.latencies_s for s in await store.status() if s.node.id == first.node.id] == [
            (0.1,)
        ]

    async def test_lease_expires_when_replica_stops_renewing(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory(StoreSettings(lease_ms=600))
        await store.add_node(A, ["m"])
        held = []
        for i in range(5):
            p = await store.pick("m", strategy="random", replica="dying", request_id=str(i))
            assert p is not None
            held.append(p.lease)
        for _ in range(4):  # renewing keeps them alive past the lease time
            await asyncio.sleep(0.25)
            assert await store.renew("dying", held) == 5
        assert await store.in_flight(A) == 5
        await asyncio.sleep(0.8)  # the replica "died": no renewal for longer than the lease
        assert await store.in_flight(A) == 0
        assert await store.renew("dying", held) == 0
        # Its late releases record nothing: the request already stopped counting.
        assert not (await store.release(held[0], Outcome.OK, 1.0)).released
        p = await store.pick("m", strategy="least_connections", replica="live", request_id="x")
        assert p is not None and p.in_flight == 1

    async def test_two_replicas_racing_leave_zero_leases_and_spread_evenly(
        self, store_factory: StoreFactory
    ) -> None:
        nodes = [f"http://127.0.0.1:{9100 + i}" for i in range(4)]
        seeder = store_factory(seed=0)
        for url in nodes:
            await seeder.add_node(url, ["m"])
        per_replica = 200

        async def run(stores: list[Store], tag: str) -> tuple[collections.Counter[str], int]:
            counts: collections.Counter[str] = collections.Counter()
            peak = 0
            rng = random.Random(tag)

            async def one(store: Store, replica: str, i: int) -> None:
                nonlocal peak
                p = await store.pick(
                    "m", strategy="least_connections", replica=replica, request_id=f"{tag}{i}"
                )
                assert p is not None
                assert p.in_flight >= 1
                peak = max(peak, p.in_flight)
                counts[p.node.id] += 1
                await asyncio.sleep(rng.random() * 0.01)
                assert (await store.release(p.lease, Outcome.OK, 0.01)).released

            await asyncio.gather(
                *(
                    one(store, f"rep{k}", i)
                    for k, store in enumerate(stores)
                    for i in range(per_replica * 2 // len(stores))
                )
            )
            return counts, peak

        two = [store_factory(seed=1), store_factory(seed=2)]
        counts2, peak2 = await run(two, "two")
        one_client = [store_factory(seed=3)]
        counts1, peak1 = await run(one_client, "one")
        total = per_replica * 2
        assert sum(counts2.values()) == sum(counts1.values()) == total
        for url in nodes:
            assert await seeder.in_flight(url) == 0
        assert all(s.in_flight == 0 for s in await seeder.status())
        # Atomic pick-and-reserve: a winner never holds more than an even share plus one.
        assert peak2 <= math.ceil(total / len(nodes)) + 1
        spread2 = statistics.pstdev(counts2[u] for u in nodes)
        spread1 = statistics.pstdev(counts1[u] for u in nodes)
        # As even as one client's, within timing noise (10% of an even share).
        assert spread2 <= spread1 + 0.10 * total / len(nodes), (counts2, counts1)
        assert peak1 >= 1

    async def test_renew_counts_only_live_leases(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        await store.add_node(B, ["m"])
        got = [
            await store.pick("m", strategy="round_robin", replica="r", request_id=str(i))
            for i in range(4)
        ]
        leases = [p.lease for p in got if p is not None]
        assert await store.renew("r", leases) == 4
        await store.release(leases[0], Outcome.NEUTRAL, 0)
        assert await store.renew("r", [*leases, Lease(A, "r:ghost")]) == 3

    async def test_fleet_above_scan_limit_is_sampled(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        nodes = [f"http://127.0.0.1:{9200 + i}" for i in range(64)]
        for url in nodes:
            await store.add_node(url, ["m"])
        held = []
        for i in range(256):
            p = await store.pick("m", strategy="least_connections", replica="r", request_id=str(i))
            assert p is not None and p.eligible <= store.settings.sample_size
            held.append(p)
        counts = collections.Counter(p.node.id for p in held)
        # Best of a sample of 8 keeps the load close to even without scanning all 64 nodes.
        assert len(counts) == 64 and max(counts.values()) <= 6


class TestEjection:
    async def test_consecutive_failures_eject_with_doubling_backoff(
        self, store_factory: StoreFactory
    ) -> None:
        settings = StoreSettings(eject_threshold=3, eject_base_ms=10_000, eject_max_ms=35_000)
        store = store_factory(settings)
        for url in (A, B, C):
            await store.add_node(url, ["m"])
        await store.refresh()

        async def fail_on(node: str, times: int) -> int:
            until = 0
            for i in range(times):
                p = await store.pick(
                    "m",
                    strategy="random",
                    replica="r",
                    request_id=f"f{node}{i}",
                    exclude=[n for n in (A, B, C) if n != node],
                )
                assert p is not None and p.node.id == node
                until = (await store.release(p.lease, Outcome.FAIL, 0.01)).ejected_until_ms
            return until

        assert await fail_on(A, 2) == 0
        now = await redis_now_ms(store)
        until = await fail_on(A, 1)
        assert 9_000 <= until - now <= 11_000
        assert A not in set(await picks(store, 30, Strategy.RANDOM))
        spans = []
        for _ in range(3):  # let each ejection lapse; the next one failure re-ejects, doubled
            await store.client.hset(
                store.keys.node(A), "ejected_until", await redis_now_ms(store) - 1
            )
            now = await redis_now_ms(store)
            spans.append(await fail_on(A, 1) - now)
        assert 19_000 <= spans[0] <= 21_000
        assert 34_000 <= spans[1] <= 36_000 and 34_000 <= spans[2] <= 36_000  # capped
        # A success resets the failure run; client errors (4xx) never count.
        await store.client.hset(store.keys.node(A), "ejected_until", 0)
        p = await store.pick("m", strategy="random", replica="r", request_id="ok", exclude=[B, C])
        assert p is not None
        await store.release(p.lease, Outcome.OK, 0.1)
        for i in range(10):
            p = await store.pick(
                "m", strategy="random", replica="r", request_id=f"4xx{i}", exclude=[B, C]
            )
            assert p is not None
            r = await store.release(p.lease, Outcome.NEUTRAL, 0.001)
            assert r.consecutive_failures == 0 and r.ejected_until_ms == 0
        assert (await store.get_node(A)).consecutive_failures == 0

    async def test_an_ejection_is_said_new_once(self, store_factory: StoreFactory) -> None:
        """Requests in flight on a node when it is ejected fail too: each release reports the
        ejection in force, only the one that made it says so (the replicas count ejections
        by it)."""
        store = store_factory(StoreSettings(eject_threshold=1))
        for url in (A, B, C):
            await store.add_node(url, ["m"])
        await store.refresh()
        leases = []
        for i in range(3):
            p = await store.pick(
                "m", strategy="random", replica="r", request_id=f"held{i}", exclude=[B, C]
            )
            assert p is not None and p.node.id == A
            leases.append(p.lease)
        results = [await store.release(lease, Outcome.FAIL, 0.01) for lease in leases]
        assert [r.ejected_now for r in results] == [True, False, False]
        assert all(r.ejected_until_ms == results[0].ejected_until_ms > 0 for r in results)
        assert (await store.get_node(A)).eject_count == 1

    async def test_never_more_than_half_the_pool_is_ejected(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory(StoreSettings(eject_threshold=1))
        nodes = [A, B, C, D]
        for url in nodes:
            await store.add_node(url, ["m"])
        await store.refresh()
        ejected = 0
        for round_ in range(3):
            for url in nodes:
                p = await store.pick(
                    "m",
                    strategy="random",
                    replica="r",
                    request_id=f"{round_}{url}",
                    exclude=[n for n in nodes if n != url],
                )
                assert p is not None
                if (await store.release(p.lease, Outcome.FAIL, 0.01)).ejected_until_ms:
                    ejected += 1
        now = await redis_now_ms(store)
        states = [await store.get_node(u) for u in nodes]
        assert sum(1 for n in states if n.ejected_until_ms > now) == 2
        # All replicas see the same ejections.
        other = store_factory(seed=9)
        assert len(set(await picks(other, 40, Strategy.RANDOM))) == 2

    async def test_lone_node_is_never_ejected_and_panic_routes(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory(StoreSettings(eject_threshold=1))
        await store.add_node(A, ["m"])
        await store.refresh()
        p = await store.pick("m", strategy="random", replica="r", request_id="1")
        assert p is not None
        assert (await store.release(p.lease, Outcome.FAIL, 0.01)).ejected_until_ms == 0
        # Even ejected by hand, the last node still takes traffic (panic mode).
        await store.client.hset(
            store.keys.node(A), "ejected_until", await redis_now_ms(store) + 60_000
        )
        assert await picks(store, 3, Strategy.RANDOM) == [A] * 3


class TestWeightedAndAffinity:
    async def test_weighted_round_robin_is_exact_across_two_replicas(
        self, store_factory: StoreFactory
    ) -> None:
        one, two = store_factory(seed=1), store_factory(seed=2)
        weights = {A: 1.0, B: 2.0, C: 5.0}
        for url, weight in weights.items():
            await one.add_node(url, ["m"], weight=weight)
        counts: collections.Counter[str] = collections.Counter()

        async def batch(store: Store, start: int) -> None:
            picked = await asyncio.gather(
                *(
                    store.pick("m", strategy="weighted_round_robin", replica="r", request_id=str(i))
                    for i in range(start, start + 100)
                )
            )
            for p in picked:
                assert p is not None
                counts[p.node.id] += 1
            await asyncio.gather(
                *(s.release(p.lease, Outcome.NEUTRAL, 0) for p in picked if p for s in (store,))
            )

        for k in range(8):  # 1,600 picks, the two replicas interleaved
            await asyncio.gather(batch(one, 200 * k), batch(two, 200 * k + 100))
        # Each pick is one atomic step of the shared smooth weighted round robin: over whole
        # cycles of 8 the shares are exact, however the replicas' picks interleave.
        assert counts == {url: 1_600 * weight / 8 for url, weight in weights.items()}, counts

    async def test_weighted_least_connections(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"], weight=1)
        await store.add_node(B, ["m"], weight=4)
        await hold(store, A, 1)
        await hold(store, B, 3)  # 3/4 < 1/1
        assert set(await picks(store, 5, Strategy.WEIGHTED_LEAST_CONNECTIONS)) == {B}

    async def _affinity(self, store: Store, keys: list[str]) -> dict[str, str]:
        out = {}
        for key in keys:
            p = await store.pick(
                "m",
                strategy="session_affinity",
                replica="r",
                request_id=f"q-{key}",
                session_key=key,
            )
            assert p is not None
            out[key] = p.node.id
            await store.release(p.lease, Outcome.NEUTRAL, 0)
        return out

    async def test_session_affinity_sticks_spreads_and_remaps_only_removed_keys(
        self, store_factory: StoreFactory
    ) -> None:
        one, two = store_factory(seed=1), store_factory(seed=2)
        nodes = [f"http://127.0.0.1:{9500 + i}" for i in range(8)]
        for url in nodes:
            await one.add_node(url, ["m"])
        keys = [f"user-{i}" for i in range(400)]
        first = await self._affinity(one, keys)
        # The same key goes to the same node, from either replica.
        assert await self._affinity(two, keys) == first
        again = await self._affinity(one, keys)
        assert sum(first[k] == again[k] for k in keys) >= 0.99 * len(keys)
        spread = collections.Counter(first.values())
        assert len(spread) == 8 and max(spread.values()) < 2 * len(keys) / 8
        # Removing one of 8 nodes moves only the keys that were on it.
        gone = nodes[3]
        await one.remove_node(gone)
        after = await self._affinity(two, keys)
        moved = [k for k in keys if after[k] != first[k]]
        assert set(moved) == {k for k in keys if first[k] == gone}
        assert 0.05 < len(moved) / len(keys) < 0.25  # about 1/8

    async def test_session_affinity_moves_keys_off_an_overloaded_node(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        for url in (A, B, C, D):
            await store.add_node(url, ["m"])
        home = (await self._affinity(store, ["heavy"]))["heavy"]
        await hold(store, home, 6)  # far above the mean of the others
        moved = await self._affinity(store, ["heavy"])
        assert moved["heavy"] != home
        # Without a session key the strategy balances like min_expected_latency.
        assert home not in set(await picks(store, 10, Strategy.SESSION_AFFINITY))


KEY_A = "key-a-0123456789abcdef"


class TestKeyStore:
    async def test_add_list_revoke(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        epoch = await store.epoch()
        key, created = await store.add_key("team-a", KEY_A)
        assert created and key.name == "team-a" and key.fingerprint == key_digest(KEY_A)[:12]
        assert await store.epoch() == epoch + 1
        again, created = await store.add_key("team-a", KEY_A)  # idempotent
        assert not created and again == key
        with pytest.raises(InvalidInput, match="already named"):
            await store.add_key("team-a", "another-key-0123456789")
        with pytest.raises(InvalidInput):
            await store.add_key("has space", "another-key-0123456789")
        with pytest.raises(InvalidInput):
            await store.add_key("short", "tooshort")
        assert [k.name for k in await store.list_keys()] == ["team-a"]
        assert (await store.registry()).key_digests == {key_digest(KEY_A)}
        assert await store.key_exists(key_digest(KEY_A))
        await store.revoke_key("team-a")
        assert not await store.key_exists(key_digest(KEY_A))
        with pytest.raises(UnknownKey):
            await store.revoke_key("team-a")
        assert await store.list_keys() == []
