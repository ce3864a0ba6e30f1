"""The fleet's queue on the embedded store: node capacity in picks, queueing when every fitting
node is full, admission in order (strict priority, fair shares between keys, arrival), at most
once, tickets that expire, leave or overflow. The same tests run against a real redis-server
in tests/e2e/test_state_on_redis.py."""

from __future__ import annotations

import asyncio

import pytest

from shared_state import Lease, NodesFull, Outcome, Priority, Store, StoreSettings, Strategy
from shared_state import admission as queue
from tests.support.store import StoreFactory

A, B = "http://127.0.0.1:9601", "http://127.0.0.1:9602"
MODEL = "m"


async def fleet(factory: StoreFactory, caps: dict[str, int], lease_ms: int = 30_000) -> Store:
    store = factory(StoreSettings(lease_ms=lease_ms))
    for url, cap in caps.items():
        await store.add_node(url, [MODEL], max_inflight=cap)
    await store.refresh_latest()
    return store


async def take(store: Store, request: str, replica: str = "r1") -> str:
    pick = await store.pick(
        MODEL, strategy=Strategy.LEAST_CONNECTIONS, replica=replica, request_id=request
    )
    assert pick is not None
    return pick.lease.node_id


async def wait(
    store: Store, request: str, priority: Priority = Priority.NORMAL, key: str = "", share: int = 1
) -> queue.Enqueued:
    return await queue.enqueue(
        store,
        model=MODEL,
        role=0,
        member=f"r1:{request}",
        priority=priority,
        fair_key=key,
        share=share,
        max_queue=0,
    )


async def free_one(store: Store, node: str, member: str) -> list[queue.Admitted]:
    """Release ``member``'s lease on ``node`` and admit in its place: who got the slot."""

    await store.release(Lease(node, member), Outcome.OK, 0.1)
    report = await queue.admit(store, MODEL, 0)
    return list(report.admitted)


class TestCapacity:
    async def test_a_pick_never_exceeds_max_inflight(self, store_factory: StoreFactory) -> None:
        store = await fleet(store_factory, {A: 2, B: 1})
        nodes = [await take(store, f"q{i}") for i in range(3)]
        assert sorted(nodes) == [A, A, B]
        with pytest.raises(NodesFull) as full:
            await take(store, "q3")
        assert full.value.nodes == 2
        assert await store.in_flight(A) == 2 and await store.in_flight(B) == 1

    async def test_a_node_without_capacity_is_never_full(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, [MODEL])
        await store.refresh_latest()
        for i in range(50):
            assert await take(store, f"q{i}") == A

    async def test_capacity_counts_every_replica(self, store_factory: StoreFactory) -> None:
        store = await fleet(store_factory, {A: 3})
        other = store_factory(seed=2)
        await other.refresh_latest()
        await take(store, "q1", "r1")
        await take(other, "q2", "r2")
        await take(store, "q3", "r1")
        with pytest.raises(NodesFull):
            await take(other, "q4", "r2")


class TestQueue:
    async def test_a_request_that_finds_room_is_admitted_at_once(
        self, store_factory: StoreFactory
    ) -> None:
        store = await fleet(store_factory, {A: 1})
        joined = await wait(store, "q1")
        assert (joined.status, joined.node_id, joined.depth) == ("admitted", A, 0)
        assert await store.in_flight(A) == 1

    async def test_a_freed_slot_goes_to_the_waiting_request(
        self, store_factory: StoreFactory
    ) -> None:
        store = await fleet(store_factory, {A: 1})
        await take(store, "q0")
        joined = await wait(store, "q1")
        assert joined.status == "queued" and joined.depth == 1
        # While it waits, a newcomer must queue too, not take the slot it waits for.
        admitted = await free_one(store, A, "r1:q0")
        assert admitted == [queue.Admitted("r1:q1", A)]
        report = await queue.admit(store, MODEL, 0, [joined.ticket])
        assert report.statuses == (A,) and report.depth == 0
        assert await store.in_flight(A) == 1

    async def test_no_request_jumps_the_queue(self, store_factory: StoreFactory) -> None:
        store = await fleet(store_factory, {A: 1})
        await take(store, "q0")
        await wait(store, "q1")

        # The slot is free for a moment (released, its admission pass not run yet).
        await store.release(Lease(A, "r1:q0"), Outcome.OK, 0.1)
        with pytest.raises(NodesFull):
            await take(store, "newcomer")
        report = await queue.admit(store, MODEL, 0)
        assert report.admitted == (queue.Admitted("r1:q1", A),)

    async def test_strict_priority_then_arrival(self, store_factory: StoreFactory) -> None:
        store = await fleet(store_factory, {A: 1})
        await take(store, "q0")
        for name, priority in [
            ("low1", Priority.LOW),
            ("n1", Priority.NORMAL),
            ("high1", Priority.HIGH),
            ("n2", Priority.NORMAL),
            ("high2", Priority.HIGH),
        ]:
            assert (await wait(store, name, priority)).status == "queued"
        order = []
        holder = "r1:q0"
        for _ in range(5):
            (admitted,) = await free_one(store, A, holder)
            holder = admitted.member
            order.append(holder.split(":")[1])
        assert order == ["high1", "high2", "n1", "n2", "low1"]

    @pytest.mark.parametrize(("share_b", "b_in_first_6"), [(1, 3), (2, 4)])
    async def test_fair_shares_between_keys(
        self, store_factory: StoreFactory, share_b: int, b_in_first_6: int
    ) -> None:
        """Key a queued 12 requests before key b queued 6: b still gets its share of the
        slots as they free, not what is left after a's backlog."""
        store = await fleet(store_factory, {A: 1})
        await take(store, "q0")
        for i in range(12):
            await wait(store, f"a{i}", key="a")
        for i in range(6):
            await wait(store, f"b{i}", key="b", share=share_b)
        order = []
        holder = "r1:q0"
        for _ in range(6):
            (admitted,) = await free_one(store, A, holder)
            holder = admitted.member
            order.append(holder.split(":")[1][0])
        assert order.count("b") == b_in_first_6
        # Within one key, arrival order.
        assert [m for m in order if m == "a"] == ["a"] * (6 - b_in_first_6)

    async def test_within_a_key_arrival_order(self, store_factory: StoreFactory) -> None:
        store = await fleet(store_factory, {A: 1})
        await take(store, "q0")
        for i in range(5):
            await wait(store, f"w{i}")
        holder, order = "r1:q0", []
        for _ in range(5):
            (admitted,) = await free_one(store, A, holder)
            holder = admitted.member
            order.append(holder)
        assert order == [f"r1:w{i}" for i in range(5)]

    async def test_a_bounded_queue_refuses_past_its_bound(
        self, store_factory: StoreFactory
    ) -> None:
        store = await fleet(store_factory, {A: 1})
        await take(store, "q0")
        results = []
        for i in range(4):
            joined = await queue.enqueue(
                store,
                model=MODEL,
                role=0,
                member=f"r1:w{i}",
                priority=Priority.NORMAL,
                fair_key="",
                share=1,
                max_queue=3,
            )
            results.append((joined.status, joined.depth))
        assert results == [("queued", 1), ("queued", 2), ("queued", 3), ("full", 3)]

    async def test_leaving_the_queue(self, store_factory: StoreFactory) -> None:
        store = await fleet(store_factory, {A: 1})
        await take(store, "q0")
        first = await wait(store, "w1")
        second = await wait(store, "w2")
        assert await queue.dequeue(store, MODEL, 0, first.ticket) == ("removed", "")
        assert await queue.dequeue(store, MODEL, 0, first.ticket) == ("gone", "")
        admitted = await free_one(store, A, "r1:q0")
        assert admitted == [queue.Admitted("r1:w2", A)]
        # Admitted before it could leave: the caller learns where its lease is.
        assert await queue.dequeue(store, MODEL, 0, second.ticket) == ("admitted", A)

    async def test_a_ticket_whose_replica_died_expires(self, store_factory: StoreFactory) -> None:
        store = await fleet(store_factory, {A: 1}, lease_ms=200)
        await take(store, "q0")
        dead = await wait(store, "dead")
        await asyncio.sleep(0.25)  # neither the lease nor the ticket was renewed
        alive = await wait(store, "alive")
        assert alive.status == "admitted" and alive.node_id == A
        report = await queue.admit(store, MODEL, 0, [dead.ticket])
        assert report.statuses == ("",)

    async def test_renewed_tickets_stay(self, store_factory: StoreFactory) -> None:
        store = await fleet(store_factory, {A: 1}, lease_ms=300)
        await take(store, "q0")
        joined = await wait(store, "w1")
        for _ in range(3):
            await asyncio.sleep(0.15)
            deadlines = store.keys.queue_keys(MODEL, 0)[3]
            await store.renew("r1", [], {deadlines: [joined.ticket]})
        report = await queue.admit(store, MODEL, 0, [joined.ticket])
        # The holder's lease expired (never renewed): its slot went to the ticket.
        assert report.statuses == (A,)

    async def test_room_made_without_a_release_is_found_by_a_pass(
        self, store_factory: StoreFactory
    ) -> None:
        store = await fleet(store_factory, {A: 1})
        await take(store, "q0")
        joined = await wait(store, "w1")
        await store.update_node(A, max_inflight=2)
        report = await queue.admit(store, MODEL, 0, [joined.ticket])
        assert report.statuses == (A,) and await store.in_flight(A) == 2

    async def test_concurrent_admissions_admit_each_ticket_once(
        self, store_factory: StoreFactory
    ) -> None:
        """Two replicas race: 40 requests on 3 slots, each released when admitted. Every
        request is admitted exactly once and no node ever holds more than its capacity."""
        store = await fleet(store_factory, {A: 2, B: 1})
        other = store_factory(seed=2)
        await other.refresh_latest()
        admitted: list[str] = []
        peak = 0

        async def one(s: Store, i: int) -> None:
            nonlocal peak
            replica = "r1" if s is store else "r2"
            member = f"{replica}:x{i}"
            try:
                node = await take(s, f"x{i}", replica)
            except NodesFull:
                joined = await queue.enqueue(
                    s,
                    model=MODEL,
                    role=0,
                    member=member,
                    priority=Priority.NORMAL,
                    fair_key="",
                    share=1,
                    max_queue=0,
                )
                node = joined.node_id
                while not node:
                    await asyncio.sleep(0.005)
                    report = await queue.admit(s, MODEL, 0, [joined.ticket])
                    assert report.statuses[0] != ""
                    node = "" if report.statuses[0] == "queued" else report.statuses[0]
            admitted.append(member)
            peak = max(peak, await s.in_flight(A) + await s.in_flight(B))
            assert await s.in_flight(A) <= 2 and await s.in_flight(B) <= 1
            await asyncio.sleep(0.002)

            await s.release(Lease(node, member), Outcome.OK, 0.01)
            await queue.admit(s, MODEL, 0)

        await asyncio.gather(*(one(store if i % 2 else other, i) for i in range(40)))
        assert sorted(admitted) == sorted(f"{'r1' if i % 2 else 'r2'}:x{i}" for i in range(40))
        assert peak <= 3
        assert await store.in_flight(A) == 0 and await store.in_flight(B) == 0


class TestReserve:
    async def test_high_priority_keeps_its_reserve(self, store_factory: StoreFactory) -> None:
        store = store_factory(StoreSettings(priority_reserve=0.25))
        await store.add_node(A, [MODEL], max_inflight=4)
        await store.refresh_latest()
        for i in range(3):
            await take(store, f"n{i}")
        with pytest.raises(NodesFull):
            await take(store, "n3")
        # Normal requests now wait; a high one is not held back by them.
        assert (await wait(store, "n3")).status == "queued"
        high = await store.pick(
            MODEL,
            strategy=Strategy.LEAST_CONNECTIONS,
            replica="r1",
            request_id="h1",
            priority=Priority.HIGH,
        )
        assert high is not None and high.lease.node_id == A
        assert await store.in_flight(A) == 4
        # The reserve slot freed goes to nobody normal: the waiting ticket stays queued.
        await store.release(high.lease, Outcome.OK, 0.1)
        report = await queue.admit(store, MODEL, 0)
        assert report.admitted == () and report.depth == 1
        # A normal slot freed goes to it.
        assert await free_one(store, A, "r1:n0") == [queue.Admitted("r1:n3", A)]

    async def test_a_node_of_one_slot_reserves_nothing(self, store_factory: StoreFactory) -> None:
        store = store_factory(StoreSettings(priority_reserve=0.9))
        await store.add_node(A, [MODEL], max_inflight=1)
        await store.refresh_latest()
        assert await take(store, "n0") == A
