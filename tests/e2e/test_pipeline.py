"""The pipelined Redis connection: replies in order, timeouts measured per command."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.exceptions as rexc

from shared_state.pipeline import AutoPipeline
from tests.support.harness import RedisServer

# Keeps Redis busy for about 50 ms, as a slow script would.
BUSY_50MS = """
local t = redis.call('TIME')
local start = tonumber(t[1]) * 1000000 + tonumber(t[2])
while true do
  t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) - start > 50000 then return 1 end
end
"""


async def test_concurrent_calls_get_their_own_replies(redis_url: str) -> None:
    pipe = AutoPipeline(redis_url, timeout_s=2.0)
    try:
        replies = await asyncio.gather(*(pipe.execute("INCRBY", "n", i) for i in range(1, 201)))
        assert sorted(replies) == sorted(set(replies)) and max(replies) == sum(range(1, 201))
        with pytest.raises(rexc.ResponseError):
            await pipe.execute("INCRBY", "n", "not-a-number")
        assert await pipe.execute("GET", "n") == str(sum(range(1, 201)))
    finally:
        await pipe.aclose()


async def test_timeout_counts_from_when_each_command_was_sent(redis_url: str) -> None:
    # A command sent just before an earlier watchdog fires must get its own full timeout.
    pipe = AutoPipeline(redis_url, timeout_s=0.25)
    try:
        for gap_s in (0.0, 0.1, 0.2, 0.22, 0.24):
            assert await pipe.execute("PING") == "PONG"
            await asyncio.sleep(gap_s)
            assert await pipe.execute("EVAL", BUSY_50MS, 0) == 1
    finally:
        await pipe.aclose()


async def test_frozen_server_fails_within_the_timeout_then_recovers() -> None:
    server = RedisServer().start()
    pipe = AutoPipeline(server.url, timeout_s=0.3)
    try:
        assert await pipe.execute("PING") == "PONG"
        server.pause()
        t0 = time.monotonic()
        with pytest.raises(rexc.TimeoutError):
            await pipe.execute("PING")
        assert time.monotonic() - t0 < 2.0
        server.resume()
        assert await pipe.execute("PING") == "PONG"  # a new connection
    finally:
        server.resume()
        await pipe.aclose()
        server.close()
