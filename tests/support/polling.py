"""Waiting for a condition to hold, without a fixed sleep: polled from a test or a coroutine."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    """Poll ``check`` until it holds or ``timeout_s`` passes; returns whether it held."""
    deadline = time.monotonic() + timeout_s
    for _ in itertools.count():
        if await check():
            return True
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return False


def wait_until(check: Callable[[], bool], timeout_s: float = 3.0, interval_s: float = 0.02) -> bool:
    """Call ``check`` until it holds or ``timeout_s`` passes; returns whether it held."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True
