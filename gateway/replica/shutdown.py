"""How a replica process stops: the proxied requests in flight get a grace period to finish,
then each one still running is cut the way a client can read — a stream ends with an
OpenAI-shaped SSE error event, an answer not begun is a 503 — and its lease is released by the
request's own clean-up before the process goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import GatewayError, render

log = logging.getLogger("fleetgate.gateway")

CUT_SETTLE_S = 5.0
"""Longest wait for cut requests to release their leases and end their answers."""


class ShuttingDown(GatewayError):
    """The replica stopped before the answer was complete; another replica can serve it."""

    status_code = 503
    error_type = "service_unavailable"
    code = "shutting_down"
    headers = ((b"retry-after", b"1"),)


class _Tracked:
    """One proxied request: its task, and how far its answer went (a wrapped ``send``)."""

    __slots__ = ("cut", "done", "send", "started", "streaming", "task")

    def __init__(self, send: Send, task: asyncio.Task[object]) -> None:
        self.send = send
        self.task = task
        self.started = self.streaming = self.done = self.cut = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            for name, value in message.get("headers", ()):
                if name == b"content-type":
                    self.streaming = value.startswith(b"text/event-stream")
        elif not message.get("more_body", False):
            self.done = True
        await self.send(message)


class Drain:
    """The proxied requests in flight, and their end when the process stops."""

    def __init__(self) -> None:
        self._live: set[_Tracked] = set()
        self._settled = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self.cut_total = 0

    async def serve(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run ``app`` on one request, kept track of so that :meth:`cut` can end it."""
        task = asyncio.current_task()
        assert task is not None
        tracked = _Tracked(send, task)
        self._live.add(tracked)
        try:
            try:
                await app(scope, receive, tracked)
            except asyncio.CancelledError:
                if not tracked.cut:
                    raise
                task.uncancel()
            if tracked.cut:  # also when the handler returned instead of raising
                await _end(tracked)
        finally:
            self._live.discard(tracked)
            if not self._live:
                self._settled.set()

    def begin(self, grace_s: float) -> None:
        """The process stops: cut what is still running after ``grace_s``."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._cut_after(grace_s))

    async def _cut_after(self, grace_s: float) -> None:
        await asyncio.sleep(grace_s)
        await self.cut()

    async def cut(self) -> int:
        """End every request still in flight now; returns how many were cut."""
        victims = [t for t in self._live if not t.done]
        if not victims:
            return 0
        log.warning("shutting down: cutting %d requests still in flight", len(victims))
        self._settled.clear()
        for tracked in victims:
            tracked.cut = True
            tracked.task.cancel()
        self.cut_total += len(victims)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), CUT_SETTLE_S)
        return len(victims)

    async def stop(self) -> None:
        """Cut at once what is left (the server is going), and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        await self.cut()


async def _end(tracked: _Tracked) -> None:
    """Finish a cut request's answer: a 503 if none began, an SSE error event on a stream."""
    if tracked.done:
        return
    status, body, extra = render(ShuttingDown("the gateway replica is shutting down; retry"))
    with contextlib.suppress(Exception):  # the client may be gone: nothing left to tell
        if not tracked.started:
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ]
            start: Message = {"type": "http.response.start", "status": status, "headers": headers}
            await tracked.send(start)
            await tracked.send({"type": "http.response.body", "body": body})
            return
        if tracked.streaming:
            event = b"data: " + body + b"\n\n"
            await tracked.send({"type": "http.response.body", "body": event, "more_body": True})
        await tracked.send({"type": "http.response.body", "body": b""})
