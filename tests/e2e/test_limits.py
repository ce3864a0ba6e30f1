"""Per-key limits end to end: a key over its requests per minute or its concurrency gets an
OpenAI-shaped 429 from either of two replicas sharing Redis, and limits set with the ops CLI
reach every replica without a restart (the limits themselves: tests/unit/test_limits.py)."""

from __future__ import annotations

import asyncio

import httpx
import orjson

from tests.support.clients import chat
from tests.support.openai_errors import assert_openai_error
from tests.support.polling import eventually
from tests.support.processes import Process, SimNode, ops, replicas_of

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"


def assert_rate_limited(response: httpx.Response, code: str) -> int:
    """An OpenAI-shaped 429 with Retry-After; returns the seconds to wait."""
    error = assert_openai_error(response, 429, code)
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    assert (error["type"], error["code"]) == ("rate_limit_error", code)
    assert "Rate limit reached" in error["message"]
    seconds = int(response.headers["retry-after"])
    assert 1 <= seconds <= 60
    return seconds


async def test_key_over_its_limit_gets_429_from_either_replica(
    redis_url: str, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "20")
    procs.append(node)
    replicas = replicas_of(procs, redis_url, node)

    added = ops(redis_url, "keys", "add", "rated", "--key", KEY_A, "--rpm", "3")
    assert added.returncode == 0, added.stderr
    assert "rpm 3, concurrency -" in added.stdout
    added = ops(redis_url, "keys", "add", "single", "--key", KEY_B, "--concurrency", "1")
    assert added.returncode == 0, added.stderr
    listing = orjson.loads(ops(redis_url, "keys", "list", "--json").stdout)
    assert [(k["name"], k["rpm"], k["concurrency"]) for k in listing] == [
        ("rated", 3, 0),
        ("single", 0, 1),
    ]

    async with httpx.AsyncClient(timeout=30) as http:

        async def closed_everywhere() -> bool:
            return all([(await chat(http, g.url, None)).status_code == 401 for g in replicas])

        assert await eventually(closed_everywhere, 5)  # every replica knows the keys

        # rpm 3: three requests spread over both replicas pass, the fourth is refused by both.
        for i in range(3):
            response = await chat(http, replicas[i % 2].url, KEY_A)
            assert response.status_code == 200, response.text
        for gateway in replicas:
            assert_rate_limited(await chat(http, gateway.url, KEY_A), "rate_limit_exceeded")
        assert (await chat(http, replicas[0].url, KEY_B)).status_code == 200  # other keys pass

        # concurrency 1: a second request in flight is refused by the other replica ...
        held = asyncio.ensure_future(chat(http, replicas[0].url, KEY_B, max_tokens=30))
        await asyncio.sleep(0.4)
        assert not held.done()
        busy = await chat(http, replicas[1].url, KEY_B)
        assert assert_rate_limited(busy, "concurrency_limit_exceeded") == 1
        assert (await held).status_code == 200
        # ... and passes as soon as the first answer is back: its slot is freed before that.
        for gateway in (replicas[1], replicas[0]):
            assert (await chat(http, gateway.url, KEY_B)).status_code == 200

        # Limits change on every replica without a restart: rpm 0 is unlimited.
        changed = ops(redis_url, "keys", "set", "rated", "--rpm", "0")
        assert changed.returncode == 0 and "changed" in changed.stdout, changed.stderr

        async def unlimited_everywhere() -> bool:
            return all([(await chat(http, g.url, KEY_A)).status_code == 200 for g in replicas])

        assert await eventually(unlimited_everywhere, 5)
    again = ops(redis_url, "keys", "set", "rated", "--rpm", "0")
    assert again.returncode == 0 and "unchanged" in again.stdout
    missing = ops(redis_url, "keys", "set", "nobody", "--rpm", "1")
    assert missing.returncode == 1 and "nobody" in missing.stderr
    bad = ops(redis_url, "keys", "set", "rated", "--rpm", "-1")
    assert bad.returncode == 2 and "whole number" in bad.stderr
