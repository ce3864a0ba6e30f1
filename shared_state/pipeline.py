"""Automatic pipelining for the request path: every script call made in one pass of the
event loop goes to Redis in one write on one connection, and replies are parsed by hiredis.

redis-py checks a connection out of its pool, arms a timer and writes once per command; at
32 concurrent requests that cost about four times the calls themselves (see DESIGN). Here a
call costs an encoded command appended to a buffer and a future. Replies come back in order,
so the n-th reply answers the n-th pending future. One watchdog per connection turns a
frozen server into a prompt error instead of a stall.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import redis.exceptions as rexc

_CRLF = b"\r\n"


def _encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(_CRLF)
    return b"".join(out)


def _ssl_context(query: dict[str, list[str]]) -> ssl.SSLContext:
    """TLS as redis-py reads it from the URL: ``ssl_ca_certs``, ``ssl_cert_reqs``."""
    context = ssl.create_default_context(cafile=query.get("ssl_ca_certs", [None])[0])
    if query.get("ssl_cert_reqs", [""])[0].lower() in {"none", "cert_none"}:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class AutoPipeline:
    """One pipelined connection to a Redis server (``redis://``, ``rediss://``, ``unix://``)."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self._unix_path = parts.path if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._ssl = _ssl_context(query) if parts.scheme == "rediss" else None
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        db_text = query.get("db", [""])[0] or (parts.path.strip("/") if not self._unix_path else "")
        self._db = int(db_text) if db_text.isdigit() else 0
        self.timeout_s = timeout_s
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        # When each pending command was queued: the watchdog times the oldest one.
        self._queued_at: collections.deque[float] = collections.deque()
        self._buffer: list[bytes] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None:
                return
            try:
                async with asyncio.timeout(self.timeout_s):
                    if self._unix_path:
                        reader, writer = await asyncio.open_unix_connection(self._unix_path)
                    else:
                        reader, writer = await asyncio.open_connection(
                            self._host, self._port, ssl=self._ssl
                        )
            except (OSError, TimeoutError) as exc:
                raise rexc.ConnectionError(f"cannot connect to Redis: {exc}") from None
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(
                self._read_replies(reader, writer)
            )
            setup: list[tuple[Any, ...]] = []
            if self._password is not None:
                auth = (self._username, self._password) if self._username else (self._password,)
                setup.append(("AUTH", *auth))
            if self._db:
                setup.append(("SELECT", self._db))
            for command in setup:
                await self._send(command)

    async def execute(self, *args: Any) -> Any:
        """Send one command; its reply, or a redis-py exception."""
        if self._writer is None:
            await self._connect()
        return await self._send(args)

    async def _send(self, args: tuple[Any, ...]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        self._queued_at.append(time.monotonic())
        self._buffer.append(_encode(args))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        reply = await future
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if message.startswith("NOSCRIPT"):
                raise rexc.NoScriptError(message)
            raise rexc.ResponseError(message)
        return reply

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute("EVAL", script, numkeys, *keys_and_args)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        if self._writer is None:
            self._fail(rexc.ConnectionError("connection to Redis lost"))
            return
        try:
            self._writer.write(data)
        except (OSError, RuntimeError) as exc:
            # The server went away after the last write and before the reader heard of it:
            # uvloop raises on a write to the closed transport (in a callback, so it would
            # only be logged, and the calls would wait for the reader to fail them).
            self._abort(rexc.ConnectionError(f"connection to Redis lost: {exc}"))
            return
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self.timeout_s, self._check)

    def _check(self) -> None:
        self._watchdog = None
        if not self._queued_at:
            return
        waited = time.monotonic() - self._queued_at[0]
        if waited >= self.timeout_s:
            self._abort(rexc.TimeoutError(f"Redis did not answer within {self.timeout_s}s"))
        else:
            delay = self.timeout_s - waited
            self._watchdog = asyncio.get_running_loop().call_later(delay, self._check)

    async def _read_replies(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        parser = hiredis.Reader(encoding="utf-8")
        pending = self._pending
        queued_at = self._queued_at
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise rexc.ConnectionError("Redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    queued_at.popleft()
                    future = pending.popleft()
                    if not future.done():
                        future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._writer is writer:
                self._abort(
                    exc if isinstance(exc, rexc.RedisError) else rexc.ConnectionError(str(exc))
                )

    def _fail(self, exc: Exception) -> None:
        self._queued_at.clear()
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(exc)

    def _abort(self, exc: Exception) -> None:
        """Drop the connection and fail every call waiting on it; the next call reconnects."""
        writer, self._writer = self._writer, None
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
        self._reader_task = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._buffer.clear()
        self._fail(exc)
        if writer is not None:
            writer.transport.abort()

    def reconnect(self, reason: str) -> None:
        """Drop the connection, failing the calls waiting on it; the next call connects anew."""
        self._abort(rexc.ConnectionError(reason))

    async def aclose(self) -> None:
        self._abort(rexc.ConnectionError("pipeline closed"))
