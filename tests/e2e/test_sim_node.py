"""The simulated LLM node served for real on a loopback port: the OpenAI API, its faults, its
slots and queue, and its command line (its settings' validation: tests/unit/test_sim_node.py)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.sim.node import NODE_KEY, SimConfig, SimNode, build_app
from tests.support import MODEL, ROOT
from tests.support.openai_errors import assert_openai_error_body

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "say hello"}]}

Start = Callable[..., Awaitable[tuple[str, SimNode]]]


@pytest.fixture
async def start_node() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> tuple[str, SimNode]:
        # Instant by default: only the tests about pacing and slots need time to pass.
        config = SimConfig(**{"port": 0, "tokens_per_s": 0.0, **overrides})
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


async def stats(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(f"{base}/sim/stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def wait_stats(http: aiohttp.ClientSession, base: str, **expected: Any) -> dict[str, Any]:
    """Poll /sim/stats until it shows the expected values (generous deadline, no timing claims)."""
    for _ in range(500):
        current = await stats(http, base)
        if all(current[k] == v for k, v in expected.items()):
            return current
        await asyncio.sleep(0.01)
    raise AssertionError(f"stats never reached {expected}: {current}")


async def set_fault(http: aiohttp.ClientSession, base: str, **body: Any) -> None:
    async with http.post(f"{base}/sim/fault", json=body) as resp:
        assert resp.status == 200, await resp.text()


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e.removeprefix("data: ") for e in events]


async def test_models_list(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node(models=("a", "b"), name="node-1")
    async with http.get(f"{base}/v1/models") as resp:
        assert resp.status == 200
        assert resp.headers["x-sim-node"] == "node-1"
        body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["a", "b"]
    assert all(m["object"] == "model" and m["owned_by"] == "fleetgate-sim" for m in body["data"])
    assert all(isinstance(m["created"], int) for m in body["data"])


async def test_chat_non_streaming(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node()
    async with http.post(f"{base}/v1/chat/completions", json={**CHAT, "max_tokens": 4}) as resp:
        assert resp.status == 200
        assert resp.headers["x-sim-node"] == base.removeprefix("http://")
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 "}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert (await stats(http, base))["served"] == 1


async def test_completions_non_streaming(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node()
    req = {"model": MODEL, "prompt": "a b c", "max_tokens": 99, "max_completion_tokens": 2}
    async with http.post(f"{base}/v1/completions", json=req) as resp:
        body = await resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "tok0 tok1 "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    async with http.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x"}) as resp:
        assert (await resp.json())["usage"]["completion_tokens"] == 16  # the default


@pytest.mark.parametrize("tokens_per_s", [0.0, 400.0])
async def test_chat_streaming(
    start_node: Start, http: aiohttp.ClientSession, tokens_per_s: float
) -> None:
    base, _ = await start_node(tokens_per_s=tokens_per_s)
    req = {**CHAT, "stream": True, "max_tokens": 5}
    async with http.post(f"{base}/v1/chat/completions", json=req) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    content = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(content) == 5
    assert content[0]["choices"][0]["delta"] == {"role": "assistant", "content": "tok0 "}
    assert (
        "".join(c["choices"][0]["delta"]["content"] for c in content) == "tok0 tok1 tok2 tok3 tok4 "
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) == 6  # no usage chunk unless asked for


async def test_streaming_usage_and_completions(
    start_node: Start, http: aiohttp.ClientSession
) -> None:
    base, _ = await start_node()
    req = {"model": MODEL, "prompt": "p q", "stream": True, "max_tokens": 3}
    req["stream_options"] = {"include_usage": True}
    async with http.post(f"{base}/v1/completions", json=req) as resp:
        events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["tok0 ", "tok1 ", "tok2 "]
    assert chunks[3]["choices"][0]["finish_reason"] == "length"
    assert chunks[4]["choices"] == []
    assert chunks[4]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


async def test_embeddings(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node()
    req = {"model": MODEL, "input": ["hello world", "x"]}
    async with http.post(f"{base}/v1/embeddings", json=req) as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1]
    vectors = [d["embedding"] for d in body["data"]]
    assert all(len(v) == 8 and all(isinstance(x, float) for x in v) for v in vectors)
    assert vectors[0] != vectors[1]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    req = {"model": MODEL, "input": "hello world", "encoding_format": "base64"}
    async with http.post(f"{base}/v1/embeddings", json=req) as resp:
        encoded = (await resp.json())["data"][0]["embedding"]
    decoded = struct.unpack("<8f", base64.b64decode(encoded))
    assert decoded == pytest.approx(vectors[0], abs=1e-6)  # deterministic, float32-rounded
    async with http.post(f"{base}/v1/embeddings", json={"model": MODEL, "input": 3}) as resp:
        assert resp.status == 400


async def test_unknown_model_and_bad_json(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        async with http.post(f"{base}{path}", json={"model": "nope", "input": "x"}) as resp:
            assert resp.status == 404
            assert "x-sim-node" in resp.headers
            body = await resp.json()
        assert_openai_error_body(body)
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["param"] == "model"
        assert body["error"]["code"] == "model_not_found"
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{base}/v1/chat/completions", data=b"{nope", headers=headers) as resp:
        assert resp.status == 400
        assert_openai_error_body(await resp.json())
    async with http.post(f"{base}/v1/chat/completions", json={**CHAT, "max_tokens": -1}) as resp:
        assert resp.status == 400


async def test_api_key(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node(api_key="sekret")
    url = f"{base}/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with http.post(url, json=CHAT, headers=headers) as resp:
            assert resp.status == 401
            assert_openai_error_body(await resp.json())
    async with http.get(f"{base}/v1/models") as resp:
        assert resp.status == 401
    async with http.post(url, json=CHAT, headers={"Authorization": "Bearer sekret"}) as resp:
        assert resp.status == 200
    async with http.get(f"{base}/health") as resp:
        assert resp.status == 200


async def test_metrics(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node(models=("m1",))
    async with http.post(f"{base}/v1/chat/completions", json={**CHAT, "model": "m1"}) as resp:
        assert resp.status == 200
    async with http.get(f"{base}/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert 'vllm:num_requests_running{model_name="m1"} 0.0' in text
    assert 'vllm:num_requests_waiting{model_name="m1"} 0.0' in text
    assert 'vllm:kv_cache_usage_perc{model_name="m1"} 0.0' in text
    assert "# TYPE sim_requests_total counter" in text
    assert re.search(r"^sim_requests_total 1$", text, re.M)


@pytest.mark.parametrize(
    ("mode", "status"),
    [("fail", 500), ("status_503", 503), ("status_429", 429), ("cannot_generate", 500)],
)
async def test_status_faults(
    start_node: Start, http: aiohttp.ClientSession, mode: str, status: int
) -> None:
    base, _ = await start_node()
    await set_fault(http, base, mode=mode)
    for req in (CHAT, {**CHAT, "stream": True}):
        async with http.post(f"{base}/v1/chat/completions", json=req) as resp:
            assert resp.status == status
            assert_openai_error_body(await resp.json())
    async with http.get(f"{base}/health") as resp:
        assert resp.status == 200  # only "unhealthy" touches the health check
    current = await stats(http, base)
    assert (current["fault"], current["served"], current["running"]) == (mode, 0, 0)


async def test_startup_fault_and_unhealthy(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node(fault="unhealthy")
    async with http.get(f"{base}/health") as resp:
        assert resp.status == 503
    async with http.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    async with http.post(f"{base}/sim/reset") as resp:
        assert (await resp.json())["fault"] == "none"
    async with http.get(f"{base}/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_count_limited_fault_reverts(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node()
    await set_fault(http, base, mode="fail", count=2)
    codes = []
    for _ in range(3):
        async with http.post(f"{base}/v1/completions", json={"model": MODEL}) as resp:
            codes.append(resp.status)
    assert codes == [500, 500, 200]
    assert (await stats(http, base))["fault"] == "none"
    async with http.post(f"{base}/sim/fault", json={"mode": "bogus"}) as resp:
        assert resp.status == 400


async def test_reset_fault(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node()
    await set_fault(http, base, mode="reset", count=1)
    with pytest.raises(aiohttp.ClientError):
        async with http.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
    async with http.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200


async def test_die_mid_stream(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node(tokens_per_s=1000.0)
    await set_fault(http, base, mode="die_mid_stream")
    lines: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):  # the chunked body never ends
        req = {**CHAT, "stream": True, "max_tokens": 10}
        async with http.post(f"{base}/v1/chat/completions", json=req) as resp:
            assert resp.status == 200
            async for line in resp.content:
                lines.append(line)
    events = [line for line in lines if line.startswith(b"data: ")]
    assert b"data: [DONE]\n" not in events
    assert len(events) == 3  # the default cut comes after the third token
    with pytest.raises(aiohttp.ClientError):  # non-streaming: no answer at all
        async with http.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
    await wait_stats(http, base, running=0, waiting=0, served=0)


async def test_hang_until_client_gives_up(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node(slots=1)
    await set_fault(http, base, mode="hang")
    timeout = aiohttp.ClientTimeout(total=0.3)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(f"{base}/v1/chat/completions", json=CHAT, timeout=timeout) as resp:
            await resp.read()
    await wait_stats(http, base, running=0, waiting=0)
    # A hung request resumes when the fault is changed by hand.
    task = asyncio.create_task(http.post(f"{base}/v1/chat/completions", json=CHAT))
    await wait_stats(http, base, running=1)
    await set_fault(http, base, mode="none")
    resp = await task
    assert resp.status == 200
    resp.release()


async def test_slow_fault(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node()
    await set_fault(http, base, mode="slow", delay_s=0.2, count=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    assert loop.time() - started >= 0.19  # a lower bound only: a slow machine cannot break it


async def test_slot_limit_and_queue(start_node: Start, http: aiohttp.ClientSession) -> None:
    # Each request would take 10 s: the test sees the batch full, then cancels the clients,
    # which must free both the slots and the queue places.
    base, _ = await start_node(slots=2, tokens_per_s=10.0, max_queue=2)
    req = {**CHAT, "max_tokens": 100}

    async def one() -> None:
        async with http.post(f"{base}/v1/chat/completions", json=req) as resp:
            await resp.read()

    tasks = [asyncio.create_task(one()) for _ in range(4)]
    await wait_stats(http, base, running=2, waiting=2)
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    assert f'vllm:num_requests_running{{model_name="{MODEL}"}} 2.0' in text
    assert f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 2.0' in text
    assert f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} 1.0' in text
    async with http.post(f"{base}/v1/chat/completions", json=req) as resp:
        assert resp.status == 503  # the queue is full
        assert (await resp.json())["error"]["code"] == "queue_full"
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_stats(http, base, running=0, waiting=0)


async def test_slots_drain_in_order(start_node: Start, http: aiohttp.ClientSession) -> None:
    base, _ = await start_node(slots=1, tokens_per_s=200.0)
    req = {**CHAT, "max_tokens": 4, "stream": True}

    async def one() -> str:
        async with http.post(f"{base}/v1/chat/completions", json=req) as resp:
            return await resp.text()

    results = await asyncio.gather(*(one() for _ in range(3)))
    assert all(sse_events(r)[-1] == "[DONE]" for r in results)
    await wait_stats(http, base, running=0, waiting=0, served=3)


async def test_disconnect_mid_stream_frees_slot(
    start_node: Start, http: aiohttp.ClientSession
) -> None:
    base, _ = await start_node(slots=1, tokens_per_s=20.0)
    req = {**CHAT, "stream": True, "max_tokens": 200}
    async with http.post(f"{base}/v1/chat/completions", json=req) as resp:
        assert (await resp.content.readline()).startswith(b"data: ")
        assert (await stats(http, base))["running"] == 1
        resp.close()
    await wait_stats(http, base, running=0, waiting=0, served=0)


async def test_shutdown_releases_hung_requests(http: aiohttp.ClientSession) -> None:
    app = build_app(SimConfig(port=0, fault="hang"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    task = asyncio.create_task(http.post(f"{base}/v1/chat/completions", json=CHAT))
    await wait_stats(http, base, running=1)
    # Far below aiohttp's 60 s shutdown timeout, which a leaked hung handler would run into.
    await asyncio.wait_for(runner.cleanup(), 10)
    resp = await task
    assert resp.status == 503
    resp.release()


async def test_cli_subprocess(http: aiohttp.ClientSession) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.sim.node", "--port", "0", "--model", "cli-model",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        match = re.match(r"fleetgate-sim listening on http://127\.0\.0\.1:(\d+) name=(\S+) ", line)
        assert match, line
        base = f"http://127.0.0.1:{match[1]}"
        async with http.get(f"{base}/health") as resp:
            assert resp.status == 200
            assert resp.headers["x-sim-node"] == match[2] == f"127.0.0.1:{match[1]}"
        async with http.get(f"{base}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["cli-model"]
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
