"""How a gateway replica process stops: on SIGTERM it refuses new connections, lets short
requests finish within the grace period and ends the streams still running with an
OpenAI-shaped SSE error event, releasing their leases; with ``--workers N`` the workers exit
when their master is gone (SIGKILL) instead of serving on unsupervised."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from shared_state import Store
from tests.support import MODEL
from tests.support.clients import async_sdk
from tests.support.openai_errors import assert_openai_error, assert_openai_error_body
from tests.support.polling import eventually, wait_until
from tests.support.processes import Gateway, Process, SimNode, children_of, running

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
GRACE_S = 2.0


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    store = Store.open(redis_url)
    yield store
    await store.close()


def refuses(port: int) -> bool:
    """Whether nothing accepts connections on the loopback ``port`` any more."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return False
    except OSError:
        return True


async def read_stream(sdk: openai.AsyncOpenAI, max_tokens: int) -> tuple[int, object]:
    """(chunks read, the error the stream ended with or None) of one streamed chat."""
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=max_tokens, stream=True
    )
    chunks = 0
    try:
        async for _ in stream:
            chunks += 1
    except openai.APIError as exc:
        return chunks, exc
    return chunks, None


async def test_sigterm_finishes_short_requests_and_ends_long_streams_with_an_error_event(
    redis_url: str, store: Store, procs: list[Process]
) -> None:
    slow = SimNode("--tokens-per-s", "5")
    procs.append(slow)
    # Leases far longer than the test: only the replica's own release can free them.
    gateway = Gateway(
        "--redis-url",
        redis_url,
        "--node",
        slow.url,
        "--lease-seconds",
        "120",
        "--shutdown-grace",
        str(GRACE_S),
    )
    procs.append(gateway)
    gateway.wait_models(MODEL)
    sdk = async_sdk(gateway.url, timeout=30)
    long_streams = [asyncio.create_task(read_stream(sdk, 100)) for _ in range(3)]
    short_stream = asyncio.create_task(read_stream(sdk, 4))  # 0.8 s at 5 tokens/s
    http = httpx.AsyncClient(timeout=30)
    long_plain = asyncio.create_task(  # 20 s, answered at the end: not begun at the cut
        http.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": MODEL, "messages": CHAT, "max_tokens": 100},
        )
    )

    async def all_in_flight() -> bool:
        return await store.in_flight(slow.url) == 5

    assert await eventually(all_in_flight, 5)
    gateway.proc.send_signal(signal.SIGTERM)
    sigterm_at = time.monotonic()
    # New connections are refused at once, while the streams still run.
    assert await asyncio.to_thread(wait_until, lambda: refuses(gateway.port), GRACE_S / 2)
    refused_after_s = time.monotonic() - sigterm_at
    short_chunks, short_error = await short_stream
    assert short_error is None and short_chunks >= 4  # finished within the grace period
    for chunks, error in await asyncio.gather(*long_streams):
        assert 0 < chunks < 100
        assert isinstance(error, openai.APIError), error
        error_body = assert_openai_error_body({"error": error.body}, "shutting_down")
        assert error_body["type"] == "service_unavailable"
    assert_openai_error(await long_plain, 503, "shutting_down")
    await http.aclose()
    cut_after_s = time.monotonic() - sigterm_at
    assert await asyncio.to_thread(gateway.proc.wait, 15) == 0
    exited_after_s = time.monotonic() - sigterm_at
    assert await store.in_flight(slow.url) == 0  # released, not left to expire
    output = gateway.output()
    assert "Traceback" not in output, output
    assert GRACE_S * 0.9 <= cut_after_s, (refused_after_s, cut_after_s)
    print(
        f"refused new connections after {refused_after_s:.2f}s, streams cut after "
        f"{cut_after_s:.2f}s, exited after {exited_after_s:.2f}s (grace {GRACE_S}s)"
    )
    await sdk.close()


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def test_workers_exit_when_their_master_is_killed(
    redis_url: str, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    gateway = Gateway("--workers", "2", "--redis-url", redis_url, "--node", node.url)
    procs.append(gateway)
    gateway.wait_models(MODEL)
    master = gateway.proc.pid
    workers = [pid for pid in children_of(master) if "spawn_main" in cmdline(pid)]
    assert len(workers) == 2, [cmdline(p) for p in children_of(master)]
    sdk = async_sdk(gateway.url, timeout=10)
    chat = await sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    assert chat.choices
    await sdk.close()
    os.kill(master, signal.SIGKILL)  # the master only, as the OOM killer would
    killed_at = time.monotonic()
    gateway.proc.wait(timeout=10)

    def workers_gone() -> bool:
        return refuses(gateway.port) and not any(running(pid) for pid in workers)

    assert await asyncio.to_thread(wait_until, workers_gone, 15), gateway.output()
    print(f"workers gone {time.monotonic() - killed_at:.2f}s after the master was killed")
    assert "Traceback" not in gateway.output(), gateway.output()


async def test_sigterm_to_the_master_of_workers_drains_every_worker(
    redis_url: str, store: Store, procs: list[Process]
) -> None:
    slow = SimNode("--tokens-per-s", "5")
    procs.append(slow)
    flags = ["--workers", "2", "--redis-url", redis_url, "--node", slow.url]
    gateway = Gateway(*flags, "--lease-seconds", "120", "--shutdown-grace", str(GRACE_S))
    procs.append(gateway)
    gateway.wait_models(MODEL)
    sdk = async_sdk(gateway.url, timeout=30)
    streams = [asyncio.create_task(read_stream(sdk, 100)) for _ in range(4)]

    async def all_in_flight() -> bool:
        return await store.in_flight(slow.url) == 4

    assert await eventually(all_in_flight, 5)
    gateway.proc.send_signal(signal.SIGTERM)
    for chunks, error in await asyncio.gather(*streams):
        assert 0 < chunks < 100
        assert isinstance(error, openai.APIError), error
        assert isinstance(error.body, dict) and error.body["code"] == "shutting_down"
    assert await asyncio.to_thread(gateway.proc.wait, 15) == 0
    assert await store.in_flight(slow.url) == 0
    assert refuses(gateway.port)
    assert "Traceback" not in gateway.output(), gateway.output()
    await sdk.close()
