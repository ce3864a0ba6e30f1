"""The pipelined connection when a write fails: the server went away after the last write and
before the reader task heard of it, and uvloop raises on a write to the closed transport. The
calls of that write fail at once with a ConnectionError (the store's breaker takes it from
there) and nothing escapes into the event loop's exception handler. The writer is a stand-in:
what is tested is the connection's own handling (on a real Redis: tests/e2e/test_pipeline.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.exceptions as rexc

from shared_state.pipeline import AutoPipeline


class ClosedTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class ClosedWriter:
    """A writer whose transport is closed, as uvloop's says so."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.writes = 0
        self.transport = ClosedTransport()

    def write(self, data: bytes) -> None:
        self.writes += 1
        raise self.error

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("unable to perform operation on <TCPTransport closed=True>"),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
)
async def test_a_failed_write_fails_its_calls_and_drops_the_connection(
    error: Exception,
) -> None:
    loop = asyncio.get_running_loop()
    escaped: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context))
    pipe = AutoPipeline("redis://127.0.0.1:1/0", timeout_s=5.0)
    writer = ClosedWriter(error)
    pipe._writer = writer  # type: ignore[assignment]
    try:
        calls = [asyncio.ensure_future(pipe.execute("PING")) for _ in range(3)]
        done, _ = await asyncio.wait(calls, timeout=1.0)
        assert len(done) == 3, "the calls waited for the reader instead of failing"
        for call in calls:
            with pytest.raises(rexc.ConnectionError, match="connection to Redis lost"):
                call.result()
        assert writer.writes == 1  # one write for the three, as always
        assert writer.transport.aborted
        assert escaped == []
        assert pipe._writer is None  # dropped: the next call connects anew
    finally:
        loop.set_exception_handler(None)
