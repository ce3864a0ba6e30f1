"""The simulated node's vLLM flavor (``--flavor vllm``), served for real on loopback and held
against answers saved from a real vLLM 0.32.0 (tests/unit/data/vllm_*, the same requests):
every answer, stream event and error has the real one's shape, field for field, and the
metrics page the real one's names and labels; the flavor's loading phase refuses connections.
The gateway in front of it: tests/e2e/test_flavors.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.checker.probes import parse_load
from gateway.sim.node import NODE_KEY, SimConfig, SimNode, build_app, serve
from tests.support.harness import free_port
from tests.support.polling import eventually

DATA = Path(__file__).parents[1] / "unit" / "data"
MODEL = "vllm-tiny"  # the saved answers' model: error messages name it
HI = [{"role": "user", "content": "hi"}]
Start = Callable[..., Awaitable[tuple[str, SimNode]]]


@pytest.fixture
async def start_node() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> tuple[str, SimNode]:
        config = SimConfig(
            **{"port": 0, "tokens_per_s": 0.0, "flavor": "vllm", "models": (MODEL,), **overrides}
        )
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


def shape(value: object) -> object:
    """``value`` with every scalar replaced by its type's name: what a client's parser meets."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def events(text: str) -> list[Any]:
    data = [e.removeprefix("data: ") for e in text.split("\n\n") if e.strip()]
    assert data[-1] == "[DONE]"
    return [orjson.loads(e) for e in data[:-1]]


def saved(name: str) -> Any:
    text = (DATA / name).read_text()
    return events(text) if name.endswith(".txt") else json.loads(text)


@pytest.mark.parametrize(
    ("path", "body", "sample"),
    [
        ("/v1/chat/completions", {"messages": HI}, "vllm_chat.json"),
        ("/v1/completions", {"prompt": "hi there"}, "vllm_completion.json"),
        ("/v1/chat/completions", {"messages": HI, "stream": True}, "vllm_chat_stream.txt"),
        (
            "/v1/chat/completions",
            {"messages": HI, "stream": True, "stream_options": {"include_usage": True}},
            "vllm_chat_stream_usage.txt",
        ),
        (
            "/v1/completions",
            {"prompt": "hi there", "stream": True, "stream_options": {"include_usage": True}},
            "vllm_completion_stream_usage.txt",
        ),
    ],
)
async def test_answers_and_streams_have_the_real_shapes(
    start_node: Start, http: aiohttp.ClientSession, path: str, body: dict[str, Any], sample: str
) -> None:
    """Three tokens, as the saved answer has: a role-only opening chunk for a chat, the finish
    reason on the last token's chunk, the usage alone after it when asked for, and nothing
    else."""
    base, _ = await start_node()
    async with http.post(f"{base}{path}", json={"model": MODEL, "max_tokens": 3, **body}) as resp:
        assert resp.status == 200
        answer = events(await resp.text()) if body.get("stream") else await resp.json()
    assert shape(answer) == shape(saved(sample))


@pytest.mark.parametrize(
    ("case", "path", "body"),
    [
        ("unknown_model", "/v1/chat/completions", {"model": "x", "messages": HI, "max_tokens": 2}),
        ("empty_messages", "/v1/chat/completions", {"model": MODEL, "messages": []}),
        ("max_tokens_over_context", "/v1/chat/completions", {"messages": HI, "max_tokens": 5000}),
        ("max_tokens_zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}),
        (
            "prompt_over_context",
            "/v1/completions",
            {"prompt": " ".join(f"item{i} of the list" for i in range(1100)), "max_tokens": 2},
        ),
        ("unknown_path", "/v1/nope", {}),
    ],
)
async def test_errors_are_the_real_ones(
    start_node: Start, http: aiohttp.ClientSession, case: str, path: str, body: dict[str, Any]
) -> None:
    base, _ = await start_node()
    async with http.post(f"{base}{path}", json={"model": MODEL, **body}) as resp:
        got = {"status": resp.status, "body": await resp.json()}
    assert got == saved("vllm_errors.json")[case]


async def test_health_models_and_metrics(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node()
    async with http.get(f"{base}/health") as resp:
        assert (resp.status, await resp.read()) == (200, b"")
        assert "Content-Type" not in resp.headers
    async with http.get(f"{base}/v1/models") as resp:
        listing = await resp.json()
    real = saved("vllm_models.json")
    assert shape(listing) == shape(real)
    assert [m["id"] for m in listing["data"]] == [MODEL]
    assert listing["data"][0]["max_model_len"] == real["data"][0]["max_model_len"]

    def series(text: str) -> set[tuple[str, frozenset[str]]]:
        """Each vllm: sample's name and label names."""
        found = set()
        for line in text.splitlines():
            if line.startswith("vllm:"):
                name, labels = line.split(" ", 1)[0].rstrip("}").split("{", 1)
                found.add((name, frozenset(pair.split("=", 1)[0] for pair in labels.split(","))))
        return found

    async with http.get(f"{base}/metrics") as resp:
        page = await resp.text()
    mine = series(page)
    assert mine <= series((DATA / "vllm_metrics.txt").read_text())
    names = {name for name, _ in mine}
    assert {"vllm:kv_cache_usage_perc", "vllm:num_requests_waiting_by_reason"} <= names
    assert {"vllm:prefix_cache_queries_total", "vllm:prompt_tokens_cached_total"} <= names
    load = parse_load(page)
    assert load is not None and (load.kv_usage, load.running, load.waiting) == (0.0, 0, 0)


async def test_cached_tokens_come_in_whole_blocks_and_add_up_in_metrics(
    start_node: Start, http: aiohttp.ClientSession
) -> None:
    base, _ = await start_node(block_tokens=16)
    system = {"role": "system", "content": " ".join(f"w{i}" for i in range(100))}
    details = []
    for question in ("first", "second"):
        chat = {"model": MODEL, "messages": [system, {"role": "user", "content": question}]}
        async with http.post(f"{base}/v1/chat/completions", json={**chat, "max_tokens": 2}) as r:
            details.append((await r.json())["usage"]["prompt_tokens_details"])
    # 101 tokens: six whole blocks made by the first, found by the second.
    assert [(d["cached_tokens"], d["created_cache_tokens"]) for d in details] == [(0, 96), (96, 0)]
    async with http.get(f"{base}/metrics") as resp:
        page = await resp.text()
    assert f'vllm:prefix_cache_hits_total{{engine="0",model_name="{MODEL}"}} 96.0' in page
    assert f'vllm:prompt_tokens_cached_total{{engine="0",model_name="{MODEL}"}} 96.0' in page
    assert f'vllm:prefix_cache_queries_total{{engine="0",model_name="{MODEL}"}} 202.0' in page


async def test_max_tokens_is_cut_to_the_context_and_fills_it_by_default(
    start_node: Start, http: aiohttp.ClientSession
) -> None:
    base, _ = await start_node()
    prompt = " ".join(f"w{i}" for i in range(96))
    async with http.post(
        f"{base}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4090}
    ) as resp:
        assert (await resp.json())["usage"]["completion_tokens"] == 4096 - 96
    async with http.post(f"{base}/v1/completions", json={"prompt": prompt}) as resp:
        assert (await resp.json())["usage"]["completion_tokens"] == 16  # and the model is its own
    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
    async with http.post(f"{base}/v1/chat/completions", json=chat) as resp:
        assert (await resp.json())["usage"]["completion_tokens"] == 4096 - 96


async def test_load_counts_the_blocks_of_running_requests_and_waiting_by_reason(
    start_node: Start, http: aiohttp.ClientSession
) -> None:
    base, node = await start_node(slots=1, tokens_per_s=20.0, block_tokens=16)
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 200, "stream": True}
    # The second waits for the slot the first holds, before its answer's headers.
    held = [asyncio.ensure_future(http.post(f"{base}/v1/completions", json=body)) for _ in "ab"]
    try:

        async def one_running_one_waiting() -> bool:
            return bool(node.stats()["running"] == 1 and node.stats()["waiting"] == 1)

        assert await eventually(one_running_one_waiting, 5)
        async with http.get(f"{base}/metrics") as resp:
            page = await resp.text()
        load = parse_load(page)
        # The running one's 203 tokens take 13 of the 256 blocks one slot's context has.
        assert load is not None and (load.running, load.waiting) == (1, 1)
        assert load.kv_usage == pytest.approx(13 / 256)
        by_reason = f'vllm:num_requests_waiting_by_reason{{engine="0",model_name="{MODEL}"'
        assert f'{by_reason},reason="capacity"}} 1.0' in page
        assert f'{by_reason},reason="deferred"}} 0.0' in page
    finally:
        for request in held:
            request.cancel()
        for answer in await asyncio.gather(*held, return_exceptions=True):
            if isinstance(answer, aiohttp.ClientResponse):
                answer.close()


async def test_loading_refuses_connections_then_listens() -> None:
    """vLLM binds its port only once its model has loaded: a client is refused, not told 503."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    served = asyncio.ensure_future(
        serve(SimConfig(port=port, flavor="vllm", loading_s=1.0, tokens_per_s=0.0))
    )
    try:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectorError):
                await http.get(f"{url}/health")

            async def listening() -> bool:
                try:
                    async with http.get(f"{url}/health") as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectorError:
                    return False

            assert await eventually(listening, 10)
            async with http.post(f"{url}/terminate") as resp:
                assert resp.status == 200
        await asyncio.wait_for(served, 10)
    finally:
        served.cancel()
