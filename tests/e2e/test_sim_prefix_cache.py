"""The simulated node's prefix cache (``--cache-blocks``, ``--block-tokens``,
``--prefill-tokens-per-s``) served by a real ``sim-node`` process and called through the openai
SDK: a repeated prompt hits its block-aligned prefix and a different one does not, streamed
answers report it in their usage chunk, the LRU forgets the oldest prompt at capacity, a cached
prompt's prefill is cheaper (the engine's own figure, and the client's clock compared within
the test), prefills take turns, and ``/metrics`` adds up to the usage the answers reported.
The cache's logic alone: tests/unit/test_sim_kvcache.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.completion_usage import CompletionUsage

from tests.support import MODEL
from tests.support.clients import async_sdk
from tests.support.processes import Process, SimNode

Messages = list[ChatCompletionMessageParam]
Start = Callable[..., tuple[SimNode, openai.AsyncOpenAI]]


@pytest.fixture
async def start(procs: list[Process]) -> AsyncIterator[Start]:
    clients: list[openai.AsyncOpenAI] = []

    def make(*flags: str) -> tuple[SimNode, openai.AsyncOpenAI]:
        node = SimNode("--tokens-per-s", "inf", *flags, name="sim-cache")
        procs.append(node)
        clients.append(async_sdk(node.url, timeout=30))
        return node, clients[-1]

    yield make
    for client in clients:
        await client.close()


def metrics(node: SimNode) -> dict[str, float]:
    """Every unlabelled or ``model_name``-labelled sample of the node's ``/metrics``."""
    found: dict[str, float] = {}
    for line in httpx.get(f"{node.url}/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name.split("{", 1)[0]] = found.get(name.split("{", 1)[0], 0.0) + float(value)
    return found


def reset_prefix_cache(node: SimNode) -> int:
    """vLLM's ``POST /reset_prefix_cache`` on the node: the blocks it dropped."""
    dropped: int = httpx.post(f"{node.url}/reset_prefix_cache", timeout=5).json()["dropped_blocks"]
    return dropped


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def cached(usage: CompletionUsage | None) -> int:
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None
    return usage.prompt_tokens_details.cached_tokens


class Asked:
    """One chat answer: its usage, the engine's prefill figure and the client's elapsed time."""

    def __init__(self, usage: CompletionUsage | None, prefill_ms: str, elapsed_s: float) -> None:
        self.usage = usage
        self.prompt_tokens = usage.prompt_tokens if usage is not None else 0
        self.cached = cached(usage)
        self.prefill_ms = float(prefill_ms)
        self.elapsed_s = elapsed_s


async def ask(client: openai.AsyncOpenAI, messages: Messages, max_tokens: int = 2) -> Asked:
    t0 = time.perf_counter()
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=max_tokens
    )
    elapsed = time.perf_counter() - t0
    return Asked(raw.parse().usage, raw.headers["x-sim-prefill-ms"], elapsed)


def chat(system: str, question: str) -> Messages:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


async def test_a_repeated_prompt_hits_its_block_aligned_prefix_a_different_one_does_not(
    start: Start,
) -> None:
    node, client = start("--cache-blocks", "256", "--block-tokens", "16")
    system = words(100, "s")
    first = await ask(client, chat(system, words(10, "q")))
    again = await ask(client, chat(system, words(10, "q")))
    follow = await ask(client, chat(system, words(30, "r")))
    other = await ask(client, chat(words(100, "o"), words(10, "q")))
    assert first.prompt_tokens == again.prompt_tokens == 110  # words, as without the cache
    assert first.cached == 0
    assert again.cached == 96  # (110 - 1) // 16 full blocks: the last token is computed again
    assert follow.cached == 96  # the system prompt's 100 words: 6 full blocks
    assert other.cached == 0  # same question, other system prompt: no shared prefix

    # Streamed, usage asked for: the last chunk carries it, cached tokens included.
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=chat(system, words(10, "q")),
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and cached(chunks[-1].usage) == 96
    assert node.stats()["kv"]["held"] == 0  # nothing holds blocks once answered


async def test_a_chats_next_turn_hits_the_previous_turn_and_its_answer(start: Start) -> None:
    _node, client = start("--cache-blocks", "256", "--block-tokens", "8")
    messages = chat(words(40, "s"), words(12, "q"))
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=20
    )
    answer = raw.parse().choices[0].message.content
    assert answer is not None
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "more"}]
    turn = await ask(client, messages)
    assert turn.prompt_tokens == 40 + 12 + 20 + 1
    assert turn.cached == 72  # all 72 words before the new question, in full blocks of 8


async def test_lru_eviction_at_capacity_forgets_the_oldest_prompt(start: Start) -> None:
    # 4 blocks of 8 tokens: each 20-word prompt caches 2 full blocks, so two prompts fill it.
    _node, client = start("--cache-blocks", "4", "--block-tokens", "8")
    prompts = {tag: chat(words(10, tag), words(10, tag + "q")) for tag in ("a", "b", "c")}
    for tag in ("a", "b", "a", "c"):  # a is used again: b is the least recently used
        await ask(client, prompts[tag], max_tokens=1)
    hits = {tag: (await ask(client, prompts[tag], max_tokens=1)).cached for tag in ("a", "c")}
    assert hits == {"a": 16, "c": 16}
    assert (await ask(client, prompts["b"], max_tokens=1)).cached == 0


async def test_a_cached_prompt_prefills_faster_and_prefills_take_turns(start: Start) -> None:
    node, client = start("--cache-blocks", "512", "--prefill-tokens-per-s", "2000")
    long = chat(words(1200, "s"), words(7, "q"))  # 1207 tokens: 0.6 s of prefill uncached
    cold = await ask(client, long)
    warm = await ask(client, long)
    assert (cold.cached, warm.cached) == (0, 1200)
    assert cold.prefill_ms == pytest.approx(1207 / 2000 * 1000, rel=1e-3)  # the engine's figure
    assert warm.prefill_ms == pytest.approx(7 / 2000 * 1000, rel=1e-3)
    assert warm.elapsed_s < cold.elapsed_s / 2  # and as the client sees it, generously

    # Three uncached prefills at once: the engine runs them one after the other, so together
    # they cannot take less than the sum of their prefill figures.
    t0 = time.perf_counter()
    answers = await asyncio.gather(
        *(ask(client, chat(words(1200, tag), "q")) for tag in ("x", "y", "z"))
    )
    elapsed = time.perf_counter() - t0
    assert all(a.cached == 0 for a in answers)
    assert elapsed >= 0.95 * sum(a.prefill_ms for a in answers) / 1000
    kv = node.stats()["kv"]
    assert kv["prefill_tokens"] == 1207 + 7 + 3 * 1201
    assert kv["prefill_s"] == pytest.approx((1207 + 7 + 3 * 1201) / 2000, rel=1e-3)


async def test_metrics_add_up_to_the_usage_reported(start: Start) -> None:
    node, client = start("--cache-blocks", "64", "--block-tokens", "16")
    asked = [
        await ask(client, chat(words(n, tag), words(5, "q")))
        for tag, n in (("a", 50), ("a", 50), ("b", 90), ("a", 70), ("b", 90))
    ]
    text = await client.completions.create(model=MODEL, prompt=words(40, "a"), max_tokens=1)
    again = await client.completions.create(model=MODEL, prompt=words(40, "a"), max_tokens=1)
    assert cached(text.usage) == 0 and cached(again.usage) == 32  # a prompt is no chat
    found = metrics(node)
    usages = [*(a.usage for a in asked), text.usage, again.usage]
    assert found["vllm:prefix_cache_queries_total"] == sum(u.prompt_tokens for u in usages if u)
    assert found["vllm:prefix_cache_hits_total"] == sum(cached(u) for u in usages) > 0
    assert found["vllm:kv_cache_usage_perc"] == 0.0  # cached, but no request holds a block
    assert found["vllm:num_requests_running"] == 0.0
    assert reset_prefix_cache(node) > 0
    assert (await ask(client, chat(words(50, "a"), words(5, "q")))).cached == 0


async def test_llamacpp_flavor_keeps_its_own_names(start: Start) -> None:
    node, client = start("--flavor", "llamacpp", "--cache-blocks", "64", "--block-tokens", "4")
    for _ in range(2):
        last = await ask(client, chat(words(20, "s"), "q"))
    assert last.cached == 20
    found = metrics(node)
    assert found["llamacpp:prompt_tokens_cached_total"] == 20
    assert not any(name.startswith("vllm:") for name in found)
