"""Real llama.cpp ``llama-server``s failing and loaded behind two gateway replicas sharing
Redis and a health-checker: a client that hangs up frees the engine's slot, an engine killed
mid-stream ends the stream with the SSE error event, an engine that restarts is probed back to
active, the checker reads each engine's load (its metrics and slots), and ``min_cache_usage``
routes by it.

A long answer here is one that runs until the slot's context is full: the tiny model is fast,
so what holds a slot long enough to be seen is length, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.engines.conftest import StartEngine, StartFleet
from tests.support.clients import async_sdk
from tests.support.engines import LlamaBuild, LlamaServer
from tests.support.polling import eventually
from tests.support.processes import Checker, Gateway

pytestmark = pytest.mark.engines

LONG = 4000  # tokens: most of a slot's 4,096


def long_body(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
        **extra,
    }


async def node_status(gateway: Gateway) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        status: dict[str, Any] = (await http.get(f"{gateway.url}/nodes/status")).json()
    return status


async def unfinished(gateway: Gateway) -> int:
    return sum(int(entry["unfinished"]) for entry in (await node_status(gateway)).values())


async def test_client_disconnect_frees_the_engines_slot(
    start_fleet: StartFleet, engines: list[LlamaServer], llama_build: LlamaBuild
) -> None:
    gateway = start_fleet()[0]
    by_url = {engine.url: engine for engine in engines}
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream(
            "POST", f"{gateway.url}/v1/completions", json=long_body(llama_build.name)
        ) as response,
    ):
        engine = by_url[response.headers["x-fleetgate-node"]]
        events = 0
        async for line in response.aiter_lines():
            events += line.startswith("data:")
            if events == 3:
                break  # generating: now hang up
        assert engine.busy_slots() == 1

    async def slot_free() -> bool:
        return await asyncio.to_thread(engine.busy_slots) == 0

    assert await eventually(slot_free, 30)
    # Freed because the request was cancelled, not because it ran to its end.
    decoded = [
        slot["next_token"][0]["n_decoded"] for slot in engine.slots() if "next_token" in slot
    ]
    assert decoded and max(decoded) < LONG
    assert await unfinished(gateway) == 0


async def test_engine_killed_mid_stream_ends_the_stream_with_an_error_event(
    start_fleet: StartFleet, engines: list[LlamaServer], llama_build: LlamaBuild
) -> None:
    gateway = start_fleet()[0]
    by_url = {engine.url: engine for engine in engines}
    sdk = async_sdk(gateway.url, timeout=60)
    got = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        async with sdk.completions.with_streaming_response.create(
            model=llama_build.name,
            prompt="Once upon a time",
            max_tokens=LONG,
            temperature=0,
            stream=True,
        ) as response:
            engine = by_url[response.headers["x-fleetgate-node"]]
            async for chunk in await response.parse():
                got.append(chunk.choices[0].text if chunk.choices else "")
                if len(got) == 3:
                    engine.kill()
    assert 3 <= len(got) < LONG
    await sdk.close()

    async def released() -> bool:
        return await unfinished(gateway) == 0

    assert await eventually(released, 10)


async def test_restarted_engine_is_probed_back_to_active(
    start_fleet: StartFleet,
    engines: list[LlamaServer],
    start_engine: StartEngine,
    start_checker: Callable[..., Checker],
) -> None:
    gateway = start_fleet()[0]
    start_checker("--probes", "health,models,metrics")
    engine = engines[0]

    def state_is(wanted: str) -> Callable[[], Any]:
        async def check() -> bool:
            state: str = (await node_status(gateway))[engine.url]["state"]
            return state == wanted

        return check

    engine.kill()
    assert await eventually(state_is("unhealthy"), 20)
    # Same port, same model: the checker's health probe finds it again. While it loads it
    # answers 503 there, which must not count as up.
    start_engine(port=engine.port)
    assert await eventually(state_is("active"), 20)


async def test_checker_reads_each_engines_load_and_min_cache_usage_routes_by_it(
    start_fleet: StartFleet,
    engines: list[LlamaServer],
    start_checker: Callable[..., Checker],
    llama_build: LlamaBuild,
) -> None:
    gateway = start_fleet("--strategy", "min_cache_usage")[0]
    start_checker("--probes", "health,metrics")

    async def loads_known() -> bool:
        status = await node_status(gateway)
        return all(status[e.url]["kv_cache_usage"] is not None for e in engines)

    assert await eventually(loads_known, 20)  # idle: 0 for both, read from /slots
    status = await node_status(gateway)
    assert all(status[e.url]["kv_cache_usage"] == 0 for e in engines)

    async with (
        httpx.AsyncClient(timeout=120) as http,
        http.stream(
            "POST",
            f"{engines[0].url}/v1/completions",  # straight to the engine: the gateway is blind
            json=long_body(llama_build.name),
        ) as held,
    ):
        assert held.status_code == 200

        async def busy_seen() -> bool:
            entry = (await node_status(gateway))[engines[0].url]
            return bool(entry["kv_cache_usage"]) and entry["requests_waiting"] == 0

        assert await eventually(busy_seen, 20)
        usage = (await node_status(gateway))[engines[0].url]["kv_cache_usage"]
        assert 0 < usage <= 0.5  # one of two slots, partly filled
        # The gateway knows nothing of that request: only the scraped load steers it away.
        for _ in range(4):
            answer = await http.post(
                f"{gateway.url}/v1/completions",
                json={"model": llama_build.name, "prompt": "Hi", "max_tokens": 1},
            )
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-fleetgate-node"] == engines[1].url
