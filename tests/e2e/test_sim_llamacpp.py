"""The simulated node's llama.cpp flavor (``--flavor llamacpp``), served for real on loopback:
what it mirrors of ``llama-server`` (checked against the real one in tests/e2e/engines) is met
by the checker's probes, the gateway and the ops CLI here, without building an engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.checker.probes import Prober, parse_gauges, slots_usage
from gateway.sim.node import NODE_KEY, SimConfig, SimNode, build_app
from shared_state import Node
from tests.support import MODEL
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, ops
from tests.support.processes import SimNode as SimProcess

Start = Callable[..., Awaitable[tuple[str, SimNode]]]
PROMPT = "one two three four five six"


@pytest.fixture
async def start_node() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> tuple[str, SimNode]:
        config = SimConfig(**{"port": 0, "tokens_per_s": 0.0, "flavor": "llamacpp", **overrides})
        app = build_app(config)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}", app[NODE_KEY]

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def events(text: str) -> list[Any]:
    data = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert data[-1] == "[DONE]"
    return [orjson.loads(e) for e in data[:-1]]


async def test_metrics_and_slots_read_as_the_real_servers_are(
    start_node: Start, http: aiohttp.ClientSession
) -> None:
    base, node = await start_node(slots=2, tokens_per_s=20.0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "stream": True}
    async with http.post(f"{base}/v1/completions", json=body) as held:
        assert held.status == 200

        async def running() -> bool:
            return bool(node.stats()["running"] == 1)

        assert await eventually(running, 5)
        async with http.get(f"{base}/metrics") as resp:
            gauges = parse_gauges(await resp.text())
        async with http.get(f"{base}/slots") as resp:
            usage = slots_usage(await resp.json())
        # The checker's probe takes the same way: metrics first, then the slots' KV figure.
        prober = Prober(5.0)
        try:
            load = await prober.load(Node(id=base, url=base, models=(MODEL,)))
        finally:
            await prober.close()
    assert (gauges.kv_usage, gauges.running, gauges.waiting, gauges.llamacpp) == (None, 1, 0, True)
    assert usage == 0.5  # one of two slots: what the vLLM flavor's gauge would say
    assert load is not None and (load.kv_usage, load.running, load.waiting) == (0.5, 1, 0)


async def test_models_streams_and_cached_tokens(
    start_node: Start, http: aiohttp.ClientSession
) -> None:
    base, _ = await start_node()
    async with http.get(f"{base}/v1/models") as resp:
        listing = await resp.json()
    assert [m["id"] for m in listing["data"]] == [MODEL]
    assert [m["name"] for m in listing["models"]] == [MODEL]
    assert listing["data"][0]["owned_by"] == "llamacpp"

    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
    async with http.post(f"{base}/v1/chat/completions", json={**chat, "stream": True}) as resp:
        chunks = events(await resp.text())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["tok0 ", "tok1 "]
    assert all("usage" not in c for c in chunks)  # chat: only when asked for, as OpenAI does

    text = {"model": MODEL, "prompt": PROMPT + " seven", "max_tokens": 2, "stream": True}
    async with http.post(f"{base}/v1/completions", json=text) as resp:
        chunks = events(await resp.text())
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    # The previous prompt's six words were cached; llama-server counts them the same way.
    assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": 6}
    async with http.post(f"{base}/v1/completions", json={**text, "stream": False}) as resp:
        again = await resp.json()
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 6}  # never the whole


async def test_loading_node_answers_503_everywhere_until_loaded(
    start_node: Start, http: aiohttp.ClientSession
) -> None:
    base, _ = await start_node(loading_s=1.0)
    for path in ("/health", "/v1/models", "/metrics", "/slots"):
        async with http.get(f"{base}{path}") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["message"] == "Loading model"
    async with http.get(f"{base}/sim/stats") as resp:
        assert resp.status == 200

    async def loaded() -> bool:
        async with http.get(f"{base}/health") as resp:
            return resp.status == 200

    assert await eventually(loaded, 10)


async def test_loading_node_is_registered_once_loaded(redis_url: str, procs: list[Process]) -> None:
    node = SimProcess("--flavor", "llamacpp", "--loading-s", "2", name="loading")
    procs.append(node)
    refused = await asyncio.to_thread(ops, redis_url, "nodes", "add", node.url)
    assert refused.returncode == 2
    assert "answered 503: Loading model" in refused.stderr, refused.stderr
    # The gateway's --node registration retries until the node has loaded.
    gateway = Gateway("--redis-url", redis_url, "--node", node.url)
    procs.append(gateway)
    await asyncio.to_thread(gateway.wait_models, MODEL, 20)
    added = await asyncio.to_thread(ops, redis_url, "nodes", "add", node.url)
    assert added.returncode == 0 and MODEL in added.stdout, added.stderr


async def test_prompt_token_counters_are_named_and_split_as_the_real_servers(
    start_node: Start, http: aiohttp.ClientSession
) -> None:
    """llama-server's ``prompt_tokens_total`` counts the prompt tokens it prefilled and
    ``prompt_tokens_cached_total`` the ones it took from its cache: their sum is the prompt."""
    base, _ = await start_node()
    real = (Path(__file__).parents[1] / "unit" / "data" / "llamacpp-metrics-busy.txt").read_text()
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1}
    for prompt in (PROMPT, PROMPT + " seven eight"):
        async with http.post(f"{base}/v1/completions", json={**body, "prompt": prompt}) as resp:
            assert resp.status == 200
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    counters = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("llamacpp:prompt_tokens")
    }
    for name in counters:
        assert f"\n{name} " in real, f"{name} is not a series of the real llama-server"
    words = len(PROMPT.split())
    # The second prompt found the whole first one cached (it is longer: never all of itself).
    assert counters["llamacpp:prompt_tokens_cached_total"] == words
    assert counters["llamacpp:prompt_tokens_total"] == words + 2
