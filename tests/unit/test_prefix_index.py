"""The prefix index on the embedded store: the cache_aware pick (longest held prefix by binary
search, expected time to first token, the load bound), recording and LRU eviction down to a
node's capacity, forgetting blocks at release, and every way a node's blocks are dropped. The
same tests run against a real redis-server in tests/e2e/test_state_on_redis.py."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from shared_state import (
    MAX_CHAIN_BLOCKS,
    HealthLedger,
    InvalidInput,
    Outcome,
    PrefixIndex,
    PrefixSettings,
    ProbeResult,
    Store,
    StoreSettings,
    Strategy,
)
from shared_state.candidates import PickRequest, candidates
from shared_state.model import Node, Registry
from shared_state.registry import RegistryView
from tests.support.store import StoreFactory

A, B, C = (f"http://127.0.0.1:{p}" for p in (9501, 9502, 9503))
CACHED = Strategy.CACHE_AWARE


def chain(name: str, n: int, start: int = 0) -> list[str]:
    """Blocks ``start``..``n - 1`` of a made-up chain: hash-like and distinct per name."""
    return [hashlib.blake2b(f"{name}:{k}".encode(), digest_size=8).hexdigest() for k in range(n)][
        start:
    ]


async def held(store: Store, node: str) -> list[str]:
    """The node's blocks, most recently used first."""
    blocks = await store.client.zrevrange(store.keys.prefix_blocks(node), 0, -1)
    return [str(b) for b in blocks]


async def scores_of(store: Store, node: str, blocks: list[str]) -> list[float]:
    """The last-use scores of ``blocks`` in the node's set (each must be held)."""
    key = store.keys.prefix_blocks(node)
    found = [await store.client.zscore(key, b) for b in blocks]
    assert all(score is not None for score in found)
    return [float(score or 0) for score in found]


async def hold(store: Store, node: str, count: int) -> None:
    """``count`` live leases on ``node``, as requests of another replica."""
    sec, usec = await store.client.time()
    deadline = int(sec) * 1000 + int(usec) // 1000 + 60_000
    await store.client.zadd(store.keys.leases(node), {f"other:{i}": deadline for i in range(count)})


async def pick_release(store: Store, blocks: list[str], tag: str) -> tuple[str, int, int]:
    """One cache_aware pick and its release: (node, matched, total)."""
    p = await store.pick("m", strategy=CACHED, replica="r", request_id=tag, blocks=blocks)
    assert p is not None
    await store.release(p.lease, Outcome.OK, 0.01)
    return p.node.id, p.prefix_matched, p.prefix_total


class TestCacheAwarePick:
    async def test_a_conversation_follows_the_node_that_holds_its_prefix(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        for url in (A, B, C):
            await store.add_node(url, ["m"])
        turn = chain("chat", 40)
        first, matched, total = await pick_release(store, turn[:10], "t1")
        assert (matched, total) == (0, 10)
        assert set(await held(store, first)) == set(turn[:10])
        for n, tag in ((20, "t2"), (30, "t3"), (40, "t4")):
            node, matched, total = await pick_release(store, turn[:n], tag)
            assert (node, matched, total) == (first, n - 10, n)
        others = [url for url in (A, B, C) if url != first]
        assert [await held(store, url) for url in others] == [[], []]

    async def test_the_longest_held_prefix_is_found_for_every_length(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        blocks = chain("long", 37)
        key = store.keys.prefix_blocks(A)
        for k in range(len(blocks) + 1):
            await store.client.delete(key)
            if k:
                await store.client.zadd(key, {b: 1000 - i for i, b in enumerate(blocks[:k])})
            p = await store.pick(
                "m", strategy=CACHED, replica="r", request_id=f"k{k}", blocks=blocks
            )
            assert p is not None and (p.prefix_matched, p.prefix_total) == (k, len(blocks))
            await store.release(p.lease, Outcome.NEUTRAL, 0.0)

    async def test_uncached_prefill_weighs_against_load_and_speed(
        self, store_factory: StoreFactory
    ) -> None:
        settings = StoreSettings(prefix=PrefixSettings(request_blocks=4.0, balance=10.0))
        store = store_factory(settings)
        await store.add_node(A, ["m"], speed=1)
        await store.add_node(B, ["m"], speed=1)
        blocks = chain("sys", 30)
        await store.client.zadd(store.keys.prefix_blocks(A), {b: 1 for b in blocks[:20]})
        # A lacks 10 blocks, B 30: A wins while its extra load costs under 20 blocks.
        await hold(store, A, 4)
        assert (await pick_release(store, blocks, "q1"))[:2] == (A, 20)
        # A holds all 30 now (it took q1): B wins once A's load costs more than 30 blocks.
        await hold(store, A, 8)
        assert (await pick_release(store, blocks, "q2"))[0] == B
        # A fast node prefills what it lacks sooner.
        await store.client.delete(store.keys.leases(A), store.keys.prefix_blocks(B))
        await store.update_node(B, speed=4)
        await store.refresh()  # no refresh left running in the background when the test ends
        assert (await pick_release(store, chain("other", 30), "q3"))[0] == B

    async def test_the_load_bound_spreads_a_hot_prefix(self, store_factory: StoreFactory) -> None:
        no_slack = PrefixSettings(balance=0.5, balance_slack=0)
        store = store_factory(StoreSettings(prefix=no_slack))
        await store.add_node(A, ["m"])
        await store.add_node(B, ["m"])
        hot = chain("hot", 200)
        picks = []
        for i in range(8):  # held in flight: each request stays on its node
            p = await store.pick("m", strategy=CACHED, replica="r", request_id=f"h{i}", blocks=hot)
            assert p is not None
            picks.append(p)
        nodes = [p.node.id for p in picks]
        assert nodes.count(A) == nodes.count(B) == 4
        # The first request went where it went; the prefix followed it until the bound.
        assert nodes[:3] == [nodes[0]] * 3 and picks[3].node.id != nodes[0]
        assert len(await held(store, A)) == len(await held(store, B)) == 200

    @pytest.mark.parametrize(("slack", "stays"), [(0, False), (2, True)])
    async def test_at_a_low_load_the_slack_keeps_a_turn_on_its_busy_node(
        self, store_factory: StoreFactory, slack: float, stays: bool
    ) -> None:
        store = store_factory(StoreSettings(prefix=PrefixSettings(balance_slack=slack)))
        nodes = [f"http://127.0.0.1:{p}" for p in (9511, 9512, 9513, 9514)]
        for url in nodes:
            await store.add_node(url, ["m"])
        home = nodes[0]
        await store.client.zadd(store.keys.prefix_blocks(home), {b: 1 for b in chain("chat", 30)})
        await hold(store, home, 1)  # one request in flight on four nodes: a mean of 0.5
        # The relative bound alone is ceil(1.5 x 0.5) = 1: the turn would leave its node to
        # prefill 30 blocks where waiting for one request costs 4; the mean + 2 lets it wait.
        node, matched, _ = await pick_release(store, chain("chat", 32), "turn")
        assert (node == home, matched) == (stays, 30 if stays else 0)
        await hold(store, home, 2)  # two in flight: 3 would pass floor(0.75 + 2) = 2
        assert (await pick_release(store, chain("chat", 32), "next"))[0] != home

    async def test_a_partial_hit_on_a_full_node_does_not_beat_room_elsewhere(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"], cache_blocks=12)
        await store.add_node(B, ["m"], cache_blocks=12)
        x = chain("x", 8)
        other = [*x[:1], *chain("other", 12, 1)]  # shares x's first block only
        await store.client.zadd(store.keys.prefix_blocks(A), {b: 1 for b in other})
        # A lacks 7 blocks, B all 8, but A would evict 7 of its 12 to take x: B has room.
        node, matched, _ = await pick_release(store, x, "x")
        assert (node, matched) == (B, 0)
        # Once both are full, the hit wins again.
        await store.client.delete(store.keys.prefix_blocks(B))
        await store.client.zadd(store.keys.prefix_blocks(B), {b: 1 for b in chain("y", 12)})
        assert (await pick_release(store, x, "again"))[:2] == (A, 1)

    async def test_a_hit_over_half_the_prompt_wins_whatever_the_speed_scale(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"], cache_blocks=12, speed=100)
        await store.add_node(B, ["m"], cache_blocks=12, speed=100)
        x = chain("x", 8)
        full = [*x[:5], *chain("other", 12, 5)]  # A is full and holds 5 of x's 8 blocks
        await store.client.zadd(store.keys.prefix_blocks(A), {b: 1 for b in full})
        # Speeds are relative: 100 and 100 weigh as 1 and 1 against evictions.
        assert (await pick_release(store, x, "x"))[:2] == (A, 5)

    async def test_eviction_keeps_capacity_and_takes_the_tail_first(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"], cache_blocks=8)
        x, y = chain("x", 6), chain("y", 6)
        await pick_release(store, x, "x")
        await asyncio.sleep(0.005)  # y is used later than x
        await pick_release(store, y, "y")
        assert sorted(await held(store, A)) == sorted(y + x[:2])
        await asyncio.sleep(0.005)
        assert (await pick_release(store, x, "x2"))[1] == 2  # x's head was kept
        await asyncio.sleep(0.005)
        # A chain longer than the capacity keeps its head.
        z = chain("z", 20)
        await pick_release(store, z, "z")
        assert await held(store, A) == z[:8]

    async def test_a_hot_prefix_is_touched_once_per_interval(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory(StoreSettings(prefix=PrefixSettings(touch_ms=60_000)))
        await store.add_node(A, ["m"])
        hot = chain("hot", 10)
        await pick_release(store, hot[:6], "one")
        before = await scores_of(store, A, hot[:6])
        await asyncio.sleep(0.005)
        assert (await pick_release(store, hot, "two"))[1] == 6
        after = dict(zip(hot, await scores_of(store, A, hot), strict=True))
        assert [after[b] for b in hot[:6]] == before  # kept, not touched again
        scores = [after[b] for b in hot]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == 10
        # Past the interval every block is touched again.
        touching = store_factory(StoreSettings(prefix=PrefixSettings(touch_ms=0)))
        await pick_release(touching, hot, "three")
        newest = await scores_of(store, A, hot)
        assert all(n > s for n, s in zip(newest, scores, strict=True))
        assert newest == sorted(newest, reverse=True)

    async def test_a_node_without_capacity_gets_the_default(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory(StoreSettings(prefix=PrefixSettings(default_capacity_blocks=5)))
        await store.add_node(A, ["m"])
        await pick_release(store, chain("c", 9), "c")
        assert len(await held(store, A)) == 5
        with pytest.raises(InvalidInput):
            await store.update_node(A, cache_blocks=0)
        node = await store.update_node(A, cache_blocks=7)
        assert node.cache_blocks == 7
        await store.refresh()
        await pick_release(store, chain("d", 9), "d")
        assert len(await held(store, A)) == 7

    async def test_a_retried_pick_keeps_its_one_lease(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        await store.add_node(B, ["m"])
        blocks = chain("r", 4)
        one = await store.pick("m", strategy=CACHED, replica="r", request_id="same", blocks=blocks)
        two = await store.pick("m", strategy=CACHED, replica="r", request_id="same", blocks=blocks)
        assert one is not None and two is not None
        assert two.node.id == one.node.id and two.reused and two.in_flight == 1

    async def test_without_blocks_it_balances_by_load(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        await store.add_node(B, ["m"])
        await hold(store, A, 2)
        for i in range(3):
            p = await store.pick("m", strategy=CACHED, replica="r", request_id=f"e{i}")
            assert p is not None and p.node.id == B and p.prefix_total == 0
            await store.release(p.lease, Outcome.OK, 0.01)

    async def test_a_chain_is_cut_at_the_cap(self, store_factory: StoreFactory) -> None:
        store = store_factory(StoreSettings(prefix=PrefixSettings(default_capacity_blocks=1 << 20)))
        await store.add_node(A, ["m"])
        blocks = chain("huge", MAX_CHAIN_BLOCKS + 100)
        assert (await pick_release(store, blocks, "big"))[2] == MAX_CHAIN_BLOCKS
        assert len(await held(store, A)) == MAX_CHAIN_BLOCKS
        assert (await pick_release(store, blocks, "again"))[1:] == (
            MAX_CHAIN_BLOCKS,
            MAX_CHAIN_BLOCKS,
        )


WHOLE = StoreSettings(prefix=PrefixSettings(whole_prompts=True))


async def prompts_on(store: Store, node: str) -> tuple[int, list[int]]:
    """Whole prompts: (the node's occupancy in blocks, the sizes of its prompts, oldest first)."""
    key = store.keys.prefix_blocks(node)
    occupancy, sizes = 0, []
    for pair in await store.client.zrange(key, 0, -1, withscores=True):
        member, score = pair[0], pair[1]
        name = member.decode() if isinstance(member, bytes) else str(member)
        if name == "~occ":
            occupancy = int(-float(score)) - 1
        elif name.startswith("~"):
            sizes.append(int(name.split(":")[1]))
    return occupancy, sizes


async def blocks_on(store: Store, node: str) -> list[str]:
    """Whole prompts: the node's blocks without the prompts' markers."""
    return [b for b in await held(store, node) if not b.startswith("~")]


async def whole_prompts_node(store_factory: StoreFactory, capacity: int) -> Store:
    """A store counting whole prompts, with node A of ``capacity`` blocks."""
    store = store_factory(WHOLE)
    await store.add_node(A, ["m"], cache_blocks=capacity)
    return store


class TestWholePrompts:
    """``--prefix-cache-unit prompts``: caches of whole prompts, as llama.cpp's llama-server
    keeps them (each prompt charged in full, one resumed from moved out of the cache)."""

    async def test_a_turn_supersedes_the_prompt_it_extends(
        self, store_factory: StoreFactory
    ) -> None:
        store = await whole_prompts_node(store_factory, 100)
        turn = chain("chat", 30)
        for n, tag in ((10, "t1"), (20, "t2"), (30, "t3")):
            node, matched, total = await pick_release(store, turn[:n], tag)
            assert (node, matched, total) == (A, n - 10, n)
            assert await prompts_on(store, A) == (n, [n])
        assert sorted(await blocks_on(store, A)) == sorted(turn)

    async def test_siblings_are_charged_whole_and_the_oldest_goes_first(
        self, store_factory: StoreFactory
    ) -> None:
        store = await whole_prompts_node(store_factory, 30)
        system = chain("sys", 10)
        x, y, z = ([*system, *chain(name, 5)] for name in "xyz")
        await pick_release(store, x, "x")
        await pick_release(store, y, "y")
        assert await prompts_on(store, A) == (30, [15, 15])
        # z resumes from y, the newest prompt (the slot's: it stays saved); x, the oldest,
        # makes room, with the blocks that were its alone.
        assert (await pick_release(store, z, "z"))[1] == 10
        assert await prompts_on(store, A) == (30, [15, 15])
        assert sorted(await blocks_on(store, A)) == sorted({*system, *y[10:], *z[10:]})
        assert (await pick_release(store, x, "x2"))[1] == 10

    async def test_resuming_from_an_older_prompt_moves_it_out(
        self, store_factory: StoreFactory
    ) -> None:
        store = await whole_prompts_node(store_factory, 100)
        system = chain("sys", 10)
        x, w = [*system, *chain("x", 5)], [*system, *chain("w", 5)]
        await pick_release(store, x, "x")
        await pick_release(store, chain("other", 8), "o")  # now the newest prompt
        # w resumes from x, a saved prompt: the engine overwrites x's history with its own.
        assert (await pick_release(store, w, "w"))[1] == 10
        assert await prompts_on(store, A) == (23, [8, 15])
        assert not set(x[10:]) & set(await blocks_on(store, A))
        assert (await pick_release(store, [*x, *chain("x2", 3)], "x2"))[1] == 10

    async def test_a_long_history_is_not_overwritten_when_there_is_room_elsewhere(
        self, store_factory: StoreFactory
    ) -> None:
        for whole, expected in ((True, B), (False, A)):
            store = store_factory(StoreSettings(prefix=PrefixSettings(whole_prompts=whole)))
            for url in (A, B):
                await store.add_node(url, ["m"], cache_blocks=200)
            system = chain(f"sys{whole}", 10)
            x = [*system, *chain(f"x{whole}", 20)]
            await hold(store, B, 1)  # x goes to A, and then another prompt: x is saved
            assert (await pick_release(store, x, f"x{whole}"))[0] == A
            assert (await pick_release(store, chain(f"other{whole}", 8), f"o{whole}"))[0] == A
            await store.client.delete(store.keys.leases(B))
            # On A a new sibling costs its 5 new blocks plus, with whole prompts, x's 20
            # blocks of history it would overwrite; on B all its 15.
            w = [*system, *chain(f"w{whole}", 5)]
            assert (await pick_release(store, w, f"w{whole}"))[0] == expected

    async def test_what_the_engine_did_not_hold_is_forgotten_and_its_prompt_still_ages_out(
        self, store_factory: StoreFactory
    ) -> None:
        store = await whole_prompts_node(store_factory, 30)
        x, y, z = chain("x", 15), chain("y", 15), chain("z", 15)
        p = await store.pick("m", strategy=CACHED, replica="r", request_id="x", blocks=x)
        assert p is not None
        await store.release(p.lease, Outcome.OK, 0.01, forget=x[5:])
        assert sorted(await blocks_on(store, A)) == sorted(x[:5])
        assert (await pick_release(store, [*x[:5], *chain("x2", 3)], "x2"))[1] == 5
        # The prompt x was charged whole; with y and z it ages out, and nothing is left of it.
        await pick_release(store, y, "y")
        await pick_release(store, z, "z")
        assert await prompts_on(store, A) == (30, [15, 15])
        assert sorted(await blocks_on(store, A)) == sorted(y + z)

    async def test_a_prompt_over_the_capacity_stays_alone(
        self, store_factory: StoreFactory
    ) -> None:
        store = await whole_prompts_node(store_factory, 20)
        await pick_release(store, chain("x", 8), "x")
        big = chain("big", 25)
        await pick_release(store, big, "big")
        assert await prompts_on(store, A) == (25, [25])
        assert sorted(await blocks_on(store, A)) == sorted(big)


class TestIndexStaysTrue:
    async def test_release_forgets_what_the_engine_did_not_hold(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        blocks = chain("f", 12)
        await pick_release(store, blocks, "one")
        p = await store.pick("m", strategy=CACHED, replica="r", request_id="two", blocks=blocks)
        assert p is not None and p.prefix_matched == 12
        result = await store.release(p.lease, Outcome.OK, 0.01, forget=blocks[5:])
        assert result.released
        assert sorted(await held(store, A)) == sorted(blocks[:5])
        assert (await pick_release(store, blocks, "three"))[1] == 5
        # Forgetting is about the engine, not the lease: an expired lease still forgets.
        await store.release(p.lease, Outcome.OK, 0.01, forget=blocks[2:])
        assert sorted(await held(store, A)) == sorted(blocks[:2])

    async def test_failures_still_see_their_pool_when_blocks_are_forgotten(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory(StoreSettings(eject_threshold=1))
        for url in (A, B, C):
            await store.add_node(url, ["m"])
        await store.refresh()
        blocks = chain("p", 3)
        p = await store.pick("m", strategy=CACHED, replica="r", request_id="x", blocks=blocks)
        assert p is not None
        result = await store.release(p.lease, Outcome.FAIL, 1.0, forget=blocks)
        assert result.ejected_now and await held(store, p.node.id) == []

    async def test_removal_drops_the_blocks(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        await pick_release(store, chain("gone", 5), "g")
        assert [s.prefix_blocks for s in await store.status()] == [5]
        await store.remove_node(A)
        assert not await store.client.exists(store.keys.prefix_blocks(A))

    async def test_forget_one_node_all_or_some(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        index = PrefixIndex(store)
        blocks = chain("s", 9)
        await pick_release(store, blocks, "s")
        assert await index.forget(A, blocks[6:]) == 3
        assert await index.forget(A) == 6
        assert await held(store, A) == []

    async def test_the_checker_drops_a_recovered_or_deregistered_node(
        self, store_factory: StoreFactory
    ) -> None:
        store = store_factory()
        await store.add_node(A, ["m"])
        await store.add_node(B, ["m"])
        ledger = HealthLedger(store, "checker")
        token, _ = await ledger.lead(10_000)
        for url in (A, B):
            await pick_release(store, chain(url, 4), url)
        # A failed long enough to be unhealthy, then recovered: probably restarted.
        for result in (ProbeResult.FAIL, ProbeResult.OK):
            report = await ledger.report(
                token, A, result, fall=1, rise=1, deregister_after_ms=0, reason="probe"
            )
            assert report.changed
        assert await held(store, A) == [] and len(await held(store, B)) == 4
        # B unhealthy past the deregistration time: removed with its blocks.
        await ledger.report(token, B, ProbeResult.FAIL, fall=1, rise=1, deregister_after_ms=1)
        await asyncio.sleep(0.01)
        report = await ledger.report(
            token, B, ProbeResult.FAIL, fall=1, rise=1, deregister_after_ms=1
        )
        assert report.status == "removed"
        assert not await store.client.exists(store.keys.prefix_blocks(B))


class TestCandidates:
    def test_past_the_limit_a_prefix_sees_the_same_nodes(self) -> None:
        nodes = tuple(
            Node(id=f"http://10.0.0.{i}:8000", url=f"http://10.0.0.{i}:8000", models=("m",))
            for i in range(100)
        )
        view = RegistryView(Registry(1, nodes))
        rng = random.Random(1)

        def request(blocks: tuple[str, ...]) -> PickRequest:
            return PickRequest("m", CACHED, "r:x", 0, (), None, None, blocks)

        one = candidates(view, request(("aa", "bb")), 32, 8, rng)
        two = candidates(view, request(("aa", "cc")), 32, 8, rng)
        other = candidates(view, request(("dd",)), 32, 8, rng)
        assert len(one) == 32 and one == two and set(other) != set(one)
        assert len(candidates(view, request(()), 32, 8, rng)) == 8  # no prefix: sampled
