"""The access log: one JSON line per request, written in batches.

Python's logging takes a lock and flushes the stream for every record, which cost about a
third of the gateway's throughput here; lines are instead gathered and written together at
most every 0.1 s (and at shutdown), so a line appears within that time.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from typing import BinaryIO

import orjson

FLUSH_EVERY_S = 0.1
FLUSH_ABOVE_BYTES = 1 << 16


class AccessLog:
    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, record: Mapping[str, object]) -> None:
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_ABOVE_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_EVERY_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stdout must not break requests
