"""``--strategy cache_aware`` end to end: gateway replicas (real processes) sharing a real
redis-server, simulated nodes, and the openai SDK as the client.

Two replicas route a conversation whose turns alternate between them to the node holding its
prefix; the load bound spreads a hot prefix; a node's capacity evicts, and removal or a node
registering again drops its blocks; an engine's ``cached_tokens`` corrects a wrong entry
(buffered and streamed answers, from a small fake node that answers with chosen usage); Redis
down gives a cache-blind local pick, said in the route receipt; the embedded store behaves the
same; the memory a node's blocks take in Redis stays within what docs/state.md says.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from shared_state import Outcome, StoreSettings, Strategy
from tests.support import MODEL
from tests.support.clients import async_sdk
from tests.support.harness import RedisServer
from tests.support.processes import Gateway, Process, SimNode, ops, together
from tests.support.store import StoreFactory

CACHE_AWARE = ("--strategy", "cache_aware")
RECEIPT = re.compile(r"prefix=(\w+)/(\d+) blocks")
Messages = list[ChatCompletionMessageParam]


def system_prompt(name: str) -> str:
    """A system prompt of about 2 kB (8 blocks of 256 bytes), its own per name."""
    return f"[{name}] " + "Answer briefly and cite your sources. " * 55


class Answer:
    """Where a request went and what the receipt said of its prefix."""

    def __init__(self, headers: Mapping[str, str], text: str) -> None:
        self.node = headers["x-fleetgate-node"]
        self.route = headers["x-fleetgate-route"]
        found = RECEIPT.search(self.route)
        assert found is not None, self.route
        self.matched, self.total = found.group(1), int(found.group(2))
        self.text = text


async def ask(client: openai.AsyncOpenAI, messages: Messages, max_tokens: int = 4) -> Answer:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,
        max_tokens=max_tokens,
    )
    completion = raw.parse()
    return Answer(raw.headers, completion.choices[0].message.content or "")


async def status(gateway: Gateway) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{gateway.url}/nodes/status", timeout=5)
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    return found


SDK = Callable[[str], openai.AsyncOpenAI]


@pytest.fixture
async def sdk() -> AsyncIterator[SDK]:
    """Makes openai clients of a gateway URL, closed when the test ends."""
    made: list[openai.AsyncOpenAI] = []

    def make(url: str) -> openai.AsyncOpenAI:
        made.append(async_sdk(url))
        return made[-1]

    yield make
    for client in made:
        await client.close()


def start(procs: list[Process], *args: str, wait: bool = True) -> Gateway:
    """A cache_aware replica; ``wait``: until its --node registrations are done."""
    gateway = Gateway(*CACHE_AWARE, *args)
    procs.append(gateway)
    if wait:
        gateway.wait_models(MODEL)
    return gateway


def sims(procs: list[Process], count: int, *flags: str) -> list[SimNode]:
    return together(procs, [SimNode(*flags, listening=False) for _ in range(count)])


def node_flags(nodes: list[SimNode]) -> list[str]:
    return [flag for node in nodes for flag in ("--node", node.url)]


async def converse(clients: list[openai.AsyncOpenAI], name: str, turns: int) -> list[Answer]:
    """One conversation, turn i sent through ``clients[i % len(clients)]``."""
    messages: Messages = [{"role": "system", "content": system_prompt(name)}]
    answers: list[Answer] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn} of {name}: " + "why? " * 60})
        answer = await ask(clients[turn % len(clients)], messages)
        messages.append({"role": "assistant", "content": answer.text})
        answers.append(answer)
    return answers


def assert_follows_its_prefix(answers: list[Answer]) -> None:
    """Every turn went to the first turn's node, which held all of the previous turn's blocks."""
    assert {a.node for a in answers} == {answers[0].node}
    assert answers[0].matched == "0"
    for before, after in itertools.pairwise(answers):
        assert after.total > before.total
        assert int(after.matched) == before.total, (before.route, after.route)


async def test_two_replicas_route_a_conversation_to_the_node_holding_its_prefix(
    redis_url: str, procs: list[Process], sdk: SDK
) -> None:
    nodes = sims(procs, 3)
    replicas = [start(procs, "--redis-url", redis_url, *node_flags(nodes)) for _ in range(2)]
    clients = [sdk(r.url) for r in replicas]
    conversations = [await converse(clients, f"chat{i}", 4) for i in range(4)]
    for answers in conversations:
        assert_follows_its_prefix(answers)
    held = {url: entry["prefix_blocks"] for url, entry in (await status(replicas[1])).items()}
    for answers in conversations:
        assert held[answers[0].node] >= answers[-1].total
    assert sum(held.values()) == sum(a[-1].total for a in conversations)


async def test_the_load_bound_spreads_a_hot_prefix(
    redis_url: str, procs: list[Process], sdk: SDK
) -> None:
    nodes = sims(procs, 2, "--tokens-per-s", "40", "--slots", "16")
    replicas = [start(procs, "--redis-url", redis_url, *node_flags(nodes)) for _ in range(2)]
    clients = [sdk(r.url) for r in replicas]
    messages: Messages = [
        # 24 blocks: more than any queue here costs (4 blocks per request in flight).
        {"role": "system", "content": system_prompt("hot") * 3},
        {"role": "user", "content": "the same question for everyone"},
    ]

    async def one(i: int) -> Answer:
        await asyncio.sleep(0.05 * i)  # in order, each still in flight when the next comes
        return await ask(clients[i % 2], messages, max_tokens=60)

    answers = await asyncio.gather(*(one(i) for i in range(8)))
    counts = {node.url: sum(a.node == node.url for a in answers) for node in nodes}
    # A balance of 0.5 and a slack of 2: the first node takes four (a fourth in flight is
    # within the mean of 2 + 2), then the mean bounds it (docs/state.md).
    assert sorted(counts.values()) == [4, 4], [a.route for a in answers]
    first = answers[0].node
    assert [a.node for a in answers[:4]] == [first] * 4 and answers[4].node != first
    assert answers[4].matched == "0" and answers[5].matched == str(answers[5].total)
    held = [entry["prefix_blocks"] for entry in (await status(replicas[0])).values()]
    assert held == [answers[0].total] * 2


async def test_capacity_evicts_and_removal_or_registering_again_drops(
    redis_url: str, procs: list[Process], sdk: SDK
) -> None:
    (node,) = sims(procs, 1)
    gateway = start(procs, "--redis-url", redis_url, wait=False)
    client = sdk(gateway.url)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        added = await http.post("/nodes/add", json={"url": node.url, "cache_blocks": 8})
        assert added.status_code == 200 and added.json()["node"]["cache_blocks"] == 8
        refused = await http.post("/nodes/add", json={"url": node.url, "cache_blocks": 0})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache_blocks"

        def prompt(name: str) -> Messages:  # 8 blocks of 256 bytes exactly
            return [{"role": "user", "content": name * 2100}]

        a, b = await ask(client, prompt("a")), await ask(client, prompt("b"))
        assert (a.matched, a.total, b.matched, b.total) == ("0", 8, "0", 8)
        entry = (await status(gateway))[node.url]
        assert (entry["cache_blocks"], entry["prefix_blocks"]) == (8, 8)
        assert (await ask(client, prompt("a"))).matched == "0"  # evicted by b
        assert (await ask(client, prompt("a"))).matched == "8"

        # LMDeploy's registration sent again: the engine restarted, its cache is empty.
        again = {"url": node.url, "status": {"models": [MODEL], "role": 1}}
        assert (await http.post("/nodes/add", json=again)).status_code == 200
        assert (await status(gateway))[node.url]["prefix_blocks"] == 0
        assert (await ask(client, prompt("a"))).matched == "0"

        store = aioredis.Redis.from_url(redis_url)
        key = f"{{fleetgate}}:prefix:{node.url}"
        assert await store.zcard(key) == 8
        assert (await http.post("/nodes/remove", json={"url": node.url})).status_code == 200
        assert not await store.exists(key)
        await store.aclose()


def test_the_ops_cli_sets_a_nodes_capacity(redis_url: str) -> None:
    url = "http://127.0.0.1:9702"
    added = ops(redis_url, "nodes", "add", url, "--model", MODEL, "--cache-blocks", "16")
    assert added.returncode == 0, added.stderr
    changed = ops(redis_url, "nodes", "set", url, "--cache-blocks", "32", "--json")
    assert changed.returncode == 0, changed.stderr
    row = orjson.loads(changed.stdout)["node"]
    assert (row["cache_blocks"], row["prefix_blocks"]) == (32, 0)
    refused = ops(redis_url, "nodes", "set", url, "--cache-blocks", "0")
    assert refused.returncode == 2 and "cache-blocks" in refused.stderr


class FakeEngine:
    """An OpenAI-shaped node on loopback that answers every request at once and reports
    ``cached`` of its 1000 prompt tokens as cached (usage in the last chunk of a stream)."""

    def __init__(self) -> None:
        self.cached = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeEngine:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        usage = {
            "prompt_tokens": 1000,
            "completion_tokens": 1,
            "total_tokens": 1001,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }
        head = {"id": "c1", "object": "chat.completion", "created": 1, "model": MODEL}
        message = {"role": "assistant", "content": "ok"}
        if not body.get("stream"):
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return web.json_response({**head, "choices": [choice], "usage": usage})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunk = {**head, "object": "chat.completion.chunk"}
        for event in (
            {**chunk, "choices": [{"index": 0, "delta": message, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": usage},
        ):
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    fake = await FakeEngine().start()
    yield fake
    await fake.close()


async def test_the_engines_cached_tokens_correct_a_wrong_entry(
    redis_url: str, procs: list[Process], engine: FakeEngine, sdk: SDK
) -> None:
    # In a thread: the fake engine answers the gateway's model query on this loop meanwhile.
    gateway = await asyncio.to_thread(start, procs, "--redis-url", redis_url, "--node", engine.url)
    client = sdk(gateway.url)
    messages: Messages = [{"role": "user", "content": "long context " * 300}]

    async def streamed() -> Answer:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in raw.parse()]
        assert chunks[-1].usage is not None
        return Answer(raw.headers, "")

    first = await ask(client, messages)
    assert first.matched == "0" and first.total > 10
    assert (await ask(client, messages)).matched == str(first.total)  # predicted: all held
    # ... but the engine said none was cached (it evicted them): the entry was corrected.
    assert (await ask(client, messages)).matched == "0"
    engine.cached = 1000  # the engine holds it now: the prediction holds, nothing is dropped
    assert (await ask(client, messages)).matched == str(first.total)
    assert (await ask(client, messages)).matched == str(first.total)
    engine.cached = 0  # a stream's last chunk says so too
    assert (await streamed()).matched == str(first.total)
    assert (await streamed()).matched == "0"
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{gateway.url}/metrics")).text
    assert f'fleetgate_prefix_blocks_total{{kind="forgotten"}} {2 * first.total}' in metrics


async def test_redis_down_routes_cache_blind_and_says_so(procs: list[Process], sdk: SDK) -> None:
    server = RedisServer().start()
    try:
        nodes = sims(procs, 2)
        gateway = start(procs, "--redis-url", server.url, *node_flags(nodes))
        client = sdk(gateway.url)
        messages: Messages = [{"role": "system", "content": system_prompt("down")}]
        shared = await ask(client, messages)
        assert "state=shared" in shared.route and shared.matched == "0"
        server.close()
        blind = await ask(client, messages)
        assert "strategy=min_expected_latency" in blind.route and "state=local" in blind.route
        assert (blind.matched, blind.total) == ("blind", shared.total)
    finally:
        server.close()


async def test_the_embedded_store_behaves_the_same(procs: list[Process], sdk: SDK) -> None:
    nodes = sims(procs, 3)
    gateway = start(procs, *node_flags(nodes))
    client = sdk(gateway.url)
    for i in range(3):
        assert_follows_its_prefix(await converse([client], f"embedded{i}", 3))
    held = [entry["prefix_blocks"] for entry in (await status(gateway)).values()]
    assert sum(held) > 0


async def test_memory_per_block_is_what_the_docs_say(
    store_factory: StoreFactory, redis_url: str
) -> None:
    """docs/state.md: about 118 bytes per block held (skiplist encoding), 140 per node."""
    store = store_factory(StoreSettings())
    await store.add_node("http://127.0.0.1:9701", ["m"], cache_blocks=4096)
    for name in ("a", "b", "c"):  # 3 x 2048 blocks: past the capacity, evicted down to it
        blocks = [f"{name}{k:015x}" for k in range(2048)]
        p = await store.pick(
            "m", strategy=Strategy.CACHE_AWARE, replica="r", request_id=name, blocks=blocks
        )
        assert p is not None
        await store.release(p.lease, Outcome.OK, 0.01)
    key = store.keys.prefix_blocks("http://127.0.0.1:9701")
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.zcard(key) == 4096
        used = await client.memory_usage(key, samples=0)
    finally:
        await client.aclose()
    assert used is not None
    per_block = used / 4096
    assert 60 < per_block <= 130, per_block
