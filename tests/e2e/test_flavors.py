"""The gateway and its health-checker in front of simulated nodes of every flavor (``--flavor``:
the simulator's own, vLLM's and llama.cpp's shapes, as tests/e2e/test_sim_vllm.py and
test_sim_llamacpp.py hold them to the real servers), where the engine's shape matters: chat
and completions plain and streamed through the ``openai`` SDK with usage and cached tokens
relayed as the node wrote them, the checker's probes and load reading, ``fleetgate nodes add``,
a node's own error relayed and never counted against it, and a node that starts late (vLLM
refuses connections while it loads, the others answer 503) probed to active.

Each test runs once per flavor; the real engines behind the same gateway: tests/e2e/engines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.ops.admin import ask_models
from gateway.sim.flavors import FLAVORS
from shared_state import InvalidInput, NodeState, Store
from tests.support import MODEL
from tests.support.clients import async_sdk
from tests.support.polling import eventually
from tests.support.processes import Checker, Gateway, Process, SimNode, ops

# The simulator's own flavor has no prefix cache unless told; the engines' flavors have one.
CACHE_FLAGS = {"sim": ("--cache-blocks", "256"), "vllm": (), "llamacpp": ()}
# The node's own count of the prompt tokens it found cached.
CACHED_COUNTER = {
    "sim": "vllm:prefix_cache_hits_total",
    "vllm": "vllm:prompt_tokens_cached_total",
    "llamacpp": "llamacpp:prompt_tokens_cached_total",
}
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture(params=FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


@dataclass(frozen=True, slots=True)
class Fleet:
    node: SimNode
    gateway: Gateway

    def counter(self, name: str) -> float:
        """The sum of the node's ``/metrics`` samples of ``name``."""
        text = httpx.get(f"{self.node.url}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ")
        )


def start_fleet(procs: list[Process], redis_url: str, flavor: str, *flags: str) -> Fleet:
    """One node of ``flavor`` and a gateway replica that registered it."""
    node = SimNode("--flavor", flavor, *flags, name=f"sim-{flavor}")
    procs.append(node)
    gateway = Gateway("--redis-url", redis_url, "--node", node.url)
    procs.append(gateway)
    gateway.wait_models(MODEL)
    return Fleet(node, gateway)


def shape(value: object) -> object:
    """``value`` with every scalar replaced by its type's name."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def parsed(response: httpx.Response) -> object:
    """A JSON answer, or an event stream's events (which must end with ``[DONE]``)."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()
    assert response.text.endswith("data: [DONE]\n\n"), response.text[-200:]
    return [orjson.loads(e[6:]) for e in response.text.split("\n\n")[:-2]]


async def test_chat_and_completions_through_the_gateway(
    flavor: str, redis_url: str, procs: list[Process], http: httpx.AsyncClient
) -> None:
    fleet = start_fleet(procs, redis_url, flavor, "--tokens-per-s", "0", *CACHE_FLAGS[flavor])
    sdk = async_sdk(fleet.gateway.url, timeout=30)
    system: ChatCompletionMessageParam = {
        "role": "system",
        "content": " ".join(f"w{i}" for i in range(64)),
    }
    chat = await sdk.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": "first?"}], max_tokens=4
    )
    text = chat.choices[0].message.content
    assert text == "tok0 tok1 tok2 tok3 " and chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 4

    before = fleet.counter(CACHED_COUNTER[flavor])
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=[system, {"role": "user", "content": "second?"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]  # the SDK parsed every one
    choices = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.delta.content or "" for c in choices) == text
    assert [c.finish_reason for c in choices].count("length") == 1
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 4
    assert usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    # What the client read is what the node counted for this very request: the system prompt.
    assert cached == fleet.counter(CACHED_COUNTER[flavor]) - before == 64

    completion = await sdk.completions.create(model=MODEL, prompt="one two three", max_tokens=3)
    assert completion.choices[0].text == "tok0 tok1 tok2 "
    pieces = [
        c
        async for c in await sdk.completions.create(
            model=MODEL, prompt="one two three", max_tokens=3, stream=True
        )
    ]
    assert "".join(c.choices[0].text for c in pieces if c.choices) == "tok0 tok1 tok2 "
    await sdk.close()

    # Through the gateway as from the node itself: the same fields, the same events, [DONE].
    for path, body in (
        ("/v1/chat/completions", {"messages": HI}),
        ("/v1/completions", {"prompt": "one two three"}),
    ):
        for extra in ({}, {"stream": True, "stream_options": {"include_usage": True}}):
            asked = {"model": MODEL, "max_tokens": 3, **body, **extra}
            through = await http.post(f"{fleet.gateway.url}{path}", json=asked)
            direct = await http.post(f"{fleet.node.url}{path}", json=asked)
            assert through.status_code == direct.status_code == 200
            assert shape(parsed(through)) == shape(parsed(direct)), (path, extra)


async def test_the_checker_probes_the_node_and_reads_its_load(
    flavor: str, redis_url: str, procs: list[Process], http: httpx.AsyncClient
) -> None:
    """One slot, one request running and one waiting: ``/nodes/status`` shows the node's KV
    use, running and waiting as the checker read them from its flavor's pages, then zeros."""
    fleet = start_fleet(procs, redis_url, flavor, "--slots", "1", "--tokens-per-s", "20")
    # No generation probe: it would wait for the slot behind the test's requests.
    checker = Checker(redis_url, f"flavor-{flavor}", "--probes", "health,models,metrics")
    procs.append(checker)
    gateway, url = fleet.gateway.url, fleet.node.url

    async def entry() -> dict[str, Any]:
        status: dict[str, Any] = (await http.get(f"{gateway}/nodes/status")).json()[url]
        return status

    async def reads(running: int, waiting: int, busy: bool) -> bool:
        found = await entry()
        usage = found["kv_cache_usage"]
        return (
            usage is not None
            and (usage > 0) is busy
            and (found["requests_running"], found["requests_waiting"]) == (running, waiting)
        )

    assert await eventually(lambda: reads(0, 0, busy=False), 10)
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 400, "stream": True}
    held = [
        asyncio.ensure_future(
            http.send(
                http.build_request("POST", f"{gateway}/v1/completions", json=body), stream=True
            )
        )
        for _ in range(2)
    ]
    try:
        assert await eventually(lambda: reads(1, 1, busy=True), 10), await entry()
    finally:
        for request in held:
            request.cancel()
        for answer in await asyncio.gather(*held, return_exceptions=True):
            if isinstance(answer, httpx.Response):
                await answer.aclose()
    assert await eventually(lambda: reads(0, 0, busy=False), 10), await entry()
    found = await entry()
    assert found["state"] == "active" and found["probe"]["successes"] > 0


async def test_nodes_add_learns_the_models(
    flavor: str, redis_url: str, procs: list[Process]
) -> None:
    node = SimNode("--flavor", flavor, "--model", "first", "--model", "second", name=flavor)
    procs.append(node)
    added = await asyncio.to_thread(ops, redis_url, "nodes", "add", node.url)
    assert added.returncode == 0, added.stderr
    store = Store.open(redis_url)
    try:
        assert (await store.get_node(node.url)).models == ("first", "second")
    finally:
        await store.close()


async def test_a_node_error_is_relayed_unchanged_and_is_no_node_failure(
    flavor: str, redis_url: str, procs: list[Process], http: httpx.AsyncClient
) -> None:
    fleet = start_fleet(procs, redis_url, flavor, "--tokens-per-s", "0")
    refused: list[dict[str, Any]] = [{"messages": HI, "max_tokens": -1}]
    if flavor == "vllm":  # what vLLM refuses besides
        refused += [{"messages": []}, {"messages": HI, "max_tokens": 5000}]
    sent = 0
    for _ in range(3):  # more in a row than passive ejection needs, were they failures
        for body in refused:
            asked = {"model": MODEL, **body}
            through = await http.post(f"{fleet.gateway.url}/v1/chat/completions", json=asked)
            direct = await http.post(f"{fleet.node.url}/v1/chat/completions", json=asked)
            sent += 2
            assert through.status_code == direct.status_code == 400
            assert through.content == direct.content
            assert through.headers["content-type"] == direct.headers["content-type"]
    status = (await http.get(f"{fleet.gateway.url}/nodes/status")).json()[fleet.node.url]
    assert (status["consecutive_failures"], status["fail_total"]) == (0, 0)
    assert not status["ejected_until_ms"] and status["state"] == "active"
    answer = await http.post(
        f"{fleet.gateway.url}/v1/chat/completions",
        json={"model": MODEL, "messages": HI, "max_tokens": 1},
    )
    assert answer.status_code == 200
    assert fleet.node.stats()["requests_total"] == sent + 1  # no 400 was tried twice


async def test_a_node_starting_late_is_probed_to_active(
    flavor: str, redis_url: str, procs: list[Process], http: httpx.AsyncClient
) -> None:
    """Registered while its model loads (vLLM does not listen yet, the others answer 503): the
    checker finds it unhealthy, then active once loaded, and the gateway routes to it."""
    checker = Checker(redis_url, f"late-{flavor}", "--fall", "2", "--rise", "2")
    procs.append(checker)
    gateway = Gateway("--redis-url", redis_url)
    procs.append(gateway)
    node = SimNode("--flavor", flavor, "--loading-s", "3", name=f"late-{flavor}", listening=False)
    procs.append(node)
    store = Store.open(redis_url)
    try:
        await store.add_node(node.url, [MODEL], reason="test")  # as nodes add --model does
        with pytest.raises(InvalidInput, match="retry when it is ready"):
            await ask_models(node.url, None)  # nodes add without --model, while it loads

        async def state_is(state: NodeState) -> bool:
            return (await store.get_node(node.url)).state is state

        assert await eventually(lambda: state_is(NodeState.UNHEALTHY), 10)
        assert await eventually(lambda: state_is(NodeState.ACTIVE), 15)
    finally:
        await store.close()
    answer = await http.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": MODEL, "messages": HI, "max_tokens": 1},
    )
    assert answer.status_code == 200 and answer.headers["x-fleetgate-node"] == node.url
