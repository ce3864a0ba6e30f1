"""The DistServe shared state on the embedded store: unique session ids across replicas, records
freed by exactly one taker under real concurrency, expiry of a dead owner's sessions, the
per-pair connect lock, and dropping a node's pairs and sessions. The same tests run against a
real redis-server in tests/e2e/test_state_on_redis.py."""

from __future__ import annotations

import asyncio

from shared_state import StoreSettings
from shared_state.pd import PDState
from tests.support.store import StoreFactory

P1, P2 = "http://127.0.0.1:9101", "http://127.0.0.1:9102"
D1, D2 = "http://127.0.0.1:9201", "http://127.0.0.1:9202"


class TestSessions:
    async def test_ids_are_unique_across_replicas(self, store_factory: StoreFactory) -> None:
        a, b = PDState(store_factory(seed=1)), PDState(store_factory(seed=2))
        ids = await asyncio.gather(
            *[(a if i % 2 else b).open_session(P1, f"r{i % 2}") for i in range(400)]
        )
        assert len(set(ids)) == 400
        assert all(isinstance(i, int) and i > 0 for i in ids)
        assert len(await a.sessions()) == 400

    async def test_one_taker_per_session(self, store_factory: StoreFactory) -> None:
        """Owner, sweep-like closers and a node drop race for the same records: each session
        is handed to exactly one of them."""
        states = [PDState(store_factory(seed=i)) for i in range(3)]
        ids = [await states[0].open_session(P1, "r0") for _ in range(100)]
        for sid in ids[:50]:
            assert await states[0].shelve(sid, D1) is False  # not connected yet
        # All the closes and the drop race at once: one gather inside another keeps the types.
        batches, (_, dropped_sessions) = await asyncio.gather(
            asyncio.gather(*[states[i % 3].close(sid) for i in range(3) for sid in ids]),
            states[1].drop_node(D1),
        )
        closed = [s.session_id for batch in batches for s in batch]
        dropped = [s.session_id for s in dropped_sessions]
        assert sorted(closed + dropped) == sorted(ids)
        assert await states[0].sessions() == []

    async def test_record_names_prefill_decode_and_owner(self, store_factory: StoreFactory) -> None:
        pd = PDState(store_factory())
        sid = await pd.open_session(P1, "replica-a")
        (session,) = await pd.sessions()
        assert (session.session_id, session.prefill, session.decode) == (sid, P1, "")
        assert await pd.shelve(sid, D2) is False
        (session,) = await pd.sessions()
        assert (session.decode, session.replica) == (D2, "replica-a")
        (closed,) = await pd.close(sid)
        assert closed == session
        assert await pd.close(sid) == []  # freed once: the second closer gets nothing
        assert await pd.shelve(sid, D1) is None  # a closed session cannot be handed on

    async def test_dead_owner_sessions_expire(self, store_factory: StoreFactory) -> None:
        pd = PDState(store_factory(StoreSettings(lease_ms=200)))
        kept = await pd.open_session(P1, "alive")
        lost = [await pd.open_session(P2, "dead") for _ in range(3)]
        assert await pd.take_expired() == []
        for _ in range(4):
            await asyncio.sleep(0.1)
            assert await pd.renew([kept]) == 1
        expired = await pd.take_expired()
        assert sorted(s.session_id for s in expired) == lost
        assert {s.prefill for s in expired} == {P2}
        assert await pd.take_expired() == []  # taken once
        assert [s.session_id for s in await pd.sessions()] == [kept]
        assert await pd.renew(lost) == 0  # an expired session is not brought back


class TestPairs:
    async def test_one_connector_per_pair(self, store_factory: StoreFactory) -> None:
        states = [PDState(store_factory(seed=i)) for i in range(4)]
        tokens = await asyncio.gather(*[s.try_lock(P1, D1, 5000) for s in states for _ in range(5)])
        winners = [t for t in tokens if t is not None]
        assert len(winners) == 1
        assert not await states[0].is_connected(P1, D1)
        assert await states[1].mark_connected(P1, D1, winners[0])
        assert await states[2].is_connected(P1, D1)
        assert await states[0].pairs() == {(P1, D1): (await states[0].pairs())[(P1, D1)]}
        # A connected pair is never locked again: "" says it is connected.
        assert await states[3].try_lock(P1, D1, 5000) == ""
        # A stale token cannot mark anything, and only the holder unlocks.
        again = await states[3].try_lock(P2, D1, 5000)
        assert again
        assert not await states[0].mark_connected(P2, D1, winners[0])
        await states[3].unlock(P2, D1, "not-the-token")
        assert await states[0].try_lock(P2, D1, 5000) is None
        await states[3].unlock(P2, D1, again)
        assert await states[0].try_lock(P2, D1, 5000)

    async def test_lock_of_a_dead_connector_expires(self, store_factory: StoreFactory) -> None:
        pd = PDState(store_factory())
        assert await pd.try_lock(P1, D2, 100) is not None
        assert await pd.try_lock(P1, D2, 100) is None
        await asyncio.sleep(0.25)
        assert await pd.try_lock(P1, D2, 100) is not None

    async def test_drop_node(self, store_factory: StoreFactory) -> None:
        pd = PDState(store_factory())
        for p in (P1, P2):
            for d in (D1, D2):
                token = await pd.try_lock(p, d, 5000)
                assert token is not None and await pd.mark_connected(p, d, token)
        on_d1 = await pd.open_session(P1, "r")
        await pd.shelve(on_d1, D1)
        on_d2 = await pd.open_session(P2, "r")
        await pd.shelve(on_d2, D2)
        prefilling = await pd.open_session(P1, "r")

        pairs, sessions = await pd.drop_node(D1)
        assert sorted(pairs) == [(P1, D1), (P2, D1)]
        assert [s.session_id for s in sessions] == [on_d1]
        assert set(await pd.pairs()) == {(P1, D2), (P2, D2)}

        pairs, sessions = await pd.drop_node(P1)
        assert pairs == [(P1, D2)]
        assert [s.session_id for s in sessions] == [prefilling]
        assert [s.session_id for s in await pd.sessions()] == [on_d2]
        assert await pd.drop_node(P1) == ([], [])
