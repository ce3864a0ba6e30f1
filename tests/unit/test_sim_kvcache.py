"""The simulated engine's prefix cache as pure logic (gateway/sim/kvcache.py): the chained block
hashes, the chat template's tokens, the LRU with held blocks, the prefill's cost and its
serialisation; served for real in tests/e2e/test_sim_prefix_cache.py."""

from __future__ import annotations

import asyncio

import pytest

from gateway.sim.answers import count_words
from gateway.sim.kvcache import (
    BlockCache,
    PrefixEngine,
    answer_tokens,
    block_hashes,
    chat_tokens,
    prefill_seconds,
    request_tokens,
)

M = "m"


def words(n: int, tag: str = "w") -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


class Sleeps:
    """A stand-in for the node's sleep: records what it was asked, yields to the loop."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.log: list[str] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.log.append("start")
        for _ in range(5):
            await asyncio.sleep(0)
        self.log.append("end")


# --- the block chain -------------------------------------------------------------------------
def test_only_full_blocks_are_hashed_and_the_chain_extends_with_the_prompt() -> None:
    assert block_hashes(M, words(15), 16) == []
    short, long = block_hashes(M, words(40), 16), block_hashes(M, words(70), 16)
    assert len(short) == 2 and len(long) == 4
    assert long[:2] == short  # a prompt extended at its end keeps its chain
    assert len(set(long)) == 4


def test_a_block_is_named_by_everything_before_it() -> None:
    base = words(48)
    changed = ["other", *base[1:]]
    a, b = block_hashes(M, base, 16), block_hashes(M, changed, 16)
    assert all(x != y for x, y in zip(a, b, strict=True))  # one word early changes every block
    assert block_hashes("other-model", base, 16)[0] != a[0]
    assert block_hashes(M, ["ab", "c"], 2) != block_hashes(M, ["a", "bc"], 2)


def test_chat_template_counts_words_and_tells_roles_and_messages_apart() -> None:
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "be brief and kind"},
        {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
    ]
    tokens = chat_tokens(messages)
    assert len(tokens) == count_words(messages) == 6  # usage's prompt_tokens
    as_user = chat_tokens([{**messages[0], "role": "user"}, messages[1]])
    assert as_user[0] != tokens[0]
    merged = chat_tokens([{"role": "user", "content": "a b"}, {"role": "user", "content": "c"}])
    assert merged != chat_tokens([{"role": "user", "content": "a b c"}])
    assert request_tokens("text", {"prompt": "a b c"}) == ["a", "b", "c"]


def test_a_chats_next_turn_starts_with_the_prompt_and_answer_before_it() -> None:
    turn1 = {"messages": [{"role": "user", "content": "what is up"}]}
    answer = "tok0 tok1 tok2 "
    turn2 = {
        "messages": [
            *turn1["messages"],
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "and then"},
        ]
    }
    before = request_tokens("chat", turn1) + answer_tokens("chat", turn1, answer)
    assert request_tokens("chat", turn2)[: len(before)] == before
    text = {"prompt": "one two"}
    assert answer_tokens("text", text, answer) == ["tok0", "tok1", "tok2"]


# --- the LRU ----------------------------------------------------------------------------------
def test_lru_evicts_the_least_recently_used_unheld_block_at_capacity() -> None:
    cache = BlockCache(3)
    a, b, c, d = b"a", b"b", b"c", b"d"
    for block in (a, b, c):
        cache.release(cache.acquire([block]))
    cache.release(cache.acquire([a]))  # a is used again: b is now the oldest
    cache.release(cache.acquire([d]))
    assert b not in cache and all(x in cache for x in (a, c, d))
    assert len(cache) == 3 and cache.evicted == 1


def test_held_blocks_are_never_evicted_and_a_full_cache_stops_caching() -> None:
    cache = BlockCache(2)
    held = cache.acquire([b"a", b"b"])
    assert held == [b"a", b"b"] and cache.held == 2
    assert cache.acquire([b"c", b"d"]) == []  # no room: computed, not cached
    assert len(cache) == 2
    cache.release(held)
    assert cache.held == 0 and cache.acquire([b"c"]) == [b"c"]
    # Freed last block first, so the tail went before the head.
    assert b"a" in cache and b"b" not in cache


def test_a_block_shared_by_two_sequences_is_held_until_both_let_go() -> None:
    cache = BlockCache(1)
    first, second = cache.acquire([b"a"]), cache.acquire([b"a"])
    cache.release(first)
    assert cache.acquire([b"b"]) == []
    cache.release(second)
    assert cache.acquire([b"b"]) == [b"b"] and b"a" not in cache


def test_match_counts_leading_blocks_only() -> None:
    cache = BlockCache(8)
    cache.release(cache.acquire([b"a", b"b", b"d"]))
    assert cache.match([b"a", b"b", b"c", b"d"]) == 2
    assert cache.match([b"x", b"a"]) == 0


# --- the prefill ------------------------------------------------------------------------------
def test_prefill_time_is_proportional_to_the_uncached_tokens() -> None:
    assert prefill_seconds(1000, 2000.0) == 0.5
    assert prefill_seconds(500, 2000.0) == pytest.approx(prefill_seconds(1000, 2000.0) / 2)
    assert prefill_seconds(1000, 0.0) == prefill_seconds(1000, float("inf")) == 0.0
    assert prefill_seconds(0, 100.0) == 0.0


async def test_a_repeated_prompt_hits_its_block_aligned_prefix_and_pays_less() -> None:
    engine = PrefixEngine(64, 16, 1000.0, [M])
    sleep = Sleeps()
    prompt = words(40)
    first = await engine.prefill(M, prompt, 4, sleep)
    engine.finish(first, None)
    again = await engine.prefill(M, prompt, 4, sleep)
    engine.finish(again, None)
    longer = await engine.prefill(M, [*prompt, *words(30, "x")], 4, sleep)
    engine.finish(longer, None)
    other = await engine.prefill(M, words(40, "o"), 4, sleep)
    engine.finish(other, None)
    assert (first.cached, again.cached, longer.cached, other.cached) == (0, 32, 32, 0)
    assert sleep.asked == [0.040, 0.008, 0.038, 0.040]
    assert [s.prefill_s for s in (first, again, longer, other)] == sleep.asked
    assert engine.stats()["queries"] == 40 + 40 + 70 + 40
    assert engine.hits == 64 == sum(s.cached for s in (first, again, longer, other))


async def test_a_whole_block_aligned_prompt_recomputes_its_last_block() -> None:
    engine = PrefixEngine(64, 16, 0.0, [M])
    sleep = Sleeps()
    for expected in (0, 16):
        seq = await engine.prefill(M, words(32), 1, sleep)
        engine.finish(seq, None)
        assert seq.cached == expected


async def test_a_completed_answer_is_cached_for_the_next_turn() -> None:
    engine = PrefixEngine(64, 4, 0.0, [M])
    sleep = Sleeps()
    body = {"messages": [{"role": "user", "content": " ".join(words(6))}]}
    seq = await engine.prefill(M, request_tokens("chat", body), 6, sleep)
    answer = "tok0 tok1 tok2 tok3 tok4 tok5 "
    engine.finish(seq, answer_tokens("chat", body, answer))
    engine.finish(seq, None)  # a second call changes nothing
    messages = [*body["messages"], {"role": "assistant", "content": answer}]
    turn = {"messages": [*messages, {"role": "user", "content": "go on"}]}
    nxt = await engine.prefill(M, request_tokens("chat", turn), 6, sleep)
    engine.finish(nxt, None)
    assert nxt.cached == 12  # 6 prompt words and 6 answer words: three blocks of 4
    assert engine.cache.held == 0


async def test_lru_at_capacity_forgets_the_oldest_prompt() -> None:
    engine = PrefixEngine(4, 4, 0.0, [M])
    sleep = Sleeps()
    for tag in ("a", "b", "a", "c"):  # 2 blocks each: c evicts b, the least recently used
        engine.finish(await engine.prefill(M, words(9, tag), 1, sleep), None)
    hits = []
    for tag in ("a", "c", "b"):
        seq = await engine.prefill(M, words(9, tag), 1, sleep)
        engine.finish(seq, None)
        hits.append(seq.cached)
    assert hits == [8, 8, 0]
    assert engine.cache.evicted >= 2 and len(engine.cache) == 4


async def test_prefills_take_turns_and_a_queued_twin_hits_what_the_first_computed() -> None:
    engine = PrefixEngine(64, 16, 1000.0, [M])
    sleep = Sleeps()
    prompt = words(33)
    first, second = await asyncio.gather(
        engine.prefill(M, prompt, 1, sleep), engine.prefill(M, prompt, 1, sleep)
    )
    assert sleep.log == ["start", "end", "start", "end"]  # never two prefills at once
    assert (first.cached, second.cached) == (0, 32)
    assert engine.cache.held == 2  # both hold the two blocks until they finish
    engine.finish(first, None)
    engine.finish(second, None)
    assert engine.cache.held == 0


async def test_a_prefill_given_up_holds_nothing() -> None:
    engine = PrefixEngine(8, 4, 1.0, [M])
    engine.finish(await engine.prefill(M, words(9), 1, Sleeps()), None)

    async def gone(seconds: float) -> None:
        raise ConnectionError

    with pytest.raises(ConnectionError):
        await engine.prefill(M, [*words(9), *words(8, "x")], 1, gone)
    assert engine.cache.held == 0 and len(engine.cache) == 2  # its new blocks never came in
    assert engine.kv_usage() == 0.0


async def test_kv_usage_counts_the_blocks_running_sequences_take() -> None:
    engine = PrefixEngine(10, 4, 0.0, [M])
    sleep = Sleeps()
    one = await engine.prefill(M, words(8), 4, sleep)  # 2 held blocks + 1 for its answer
    two = await engine.prefill(M, words(8), 4, sleep)  # shares the 2, reserves 1 more
    assert engine.kv_usage() == pytest.approx(0.4)
    engine.finish(one, None)
    engine.finish(two, None)
    assert engine.kv_usage() == 0.0 and len(engine.cache) == 2  # cached, free to take
    assert PrefixEngine(0, 4, 100.0, [M]).kv_usage() == 0.0
