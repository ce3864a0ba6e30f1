"""Upstream HTTP: the only module that talks to LLM nodes on the request path.

A lean HTTP/1.1 client: keep-alive connections pooled per node, requests written as one
buffer straight from the ASGI headers (bytes in, bytes out), and responses parsed by
llhttp through httptools. On this machine kind aiohttp's per-request bookkeeping was about a
fifth of the gateway's CPU at 32 concurrent requests; this client does the same work with a
fraction of it. Bodies are relayed as bytes, never decoded; compressed answers pass through.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools
import orjson

from shared_state import InvalidInput, Node
from shared_state.registry import validate_api_key

# Hop-by-hop headers (RFC 9110 7.6.1) plus those this client writes itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
    }
)
# Credentials meant for the gateway: never forwarded to a node.
CLIENT_CREDENTIALS = frozenset({b"authorization", b"x-api-key", b"api-key", b"cookie"})
DROP_REQUEST = HOP_BY_HOP | CLIENT_CREDENTIALS
# With tracing on, the node gets the gateway's own span as its parent instead of the client's.
DROP_TRACED = DROP_REQUEST | {b"traceparent"}
DROP_RESPONSE = HOP_BY_HOP | {b"date", b"server"}
IDLE_PER_ORIGIN = 256
PAUSE_ABOVE_BYTES = 1 << 20  # stop reading from a node while this much waits for the client
# A timeout firing this late means the process was not running (see _Connection.wait); the
# silence is then measured again for this long.
LATE_TIMER_S = 0.25
LATE_TIMER_GRACE_S = 0.5


class UpstreamFailure(Exception):
    """The node could not be reached, reset the connection, or timed out."""

    def __init__(self, message: str, *, timeout: bool = False, sent: bool = True) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.sent = sent  # False: no connection was made, so the node never saw the request


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    first_byte_s: float  # until the response headers, and the longest silence afterwards
    request_s: float  # the whole exchange


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    prefix: bytes  # the node URL's own path, put before each request path
    host_header: bytes
    insecure: bool = False  # https without certificate checks (a self-signed fleet)
    authorization: bytes = b""  # the header line that carries the node's API key, if any
    refusal: str = ""  # why no request may go to this origin (a key no header can carry)


def origin_of(url: str, insecure: bool = False, api_key: str | None = None) -> Origin:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    default = (parts.scheme == "https" and port == 443) or (parts.scheme == "http" and port == 80)
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if default else f"{shown}:{port}"
    authorization, refusal = b"", ""
    if api_key:
        try:
            # Registration validates keys; this guards keys written into the store directly.
            authorization = b"\r\nauthorization: Bearer " + validate_api_key(api_key).encode()
        except InvalidInput as exc:
            refusal = f"the node's api_key cannot be sent: {exc}"
    prefix = parts.path.rstrip("/").encode()
    return Origin(
        parts.scheme, host, port, prefix, host_header.encode(), insecure, authorization, refusal
    )


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received_any = False
        self.error: UpstreamFailure | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.wakes = 0  # news from the node so far (see wait)

    # -- transport events ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamFailure("node tried to upgrade the connection"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamFailure(f"malformed answer from node: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            detail = f": {exc}" if exc else ""
            self._fail(UpstreamFailure(f"node closed the connection{detail}"))

    # -- parser callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:
            self.headers.clear()  # an interim answer; the real one follows
            return
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_ABOVE_BYTES and not self.paused and self.transport:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            return  # llhttp goes on with the final answer in the same stream
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # -- consumer side -------------------------------------------------------------------

    def _wake(self) -> None:
        self.wakes += 1
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamFailure) -> None:
        if self.error is None:
            self.error = error
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    async def wait(self, timeout_s: float) -> None:
        """Wait for anything new from the node, at most ``timeout_s``.

        A timer that fires well after it was due means this process did not run meanwhile
        (SIGSTOP, a frozen VM, a blocked loop): on waking its timers are due before the bytes
        that arrived in the pause are read, so the silence is measured once more, briefly,
        before the node is called silent."""
        due = self.loop.time() + timeout_s
        seen = self.wakes
        for grace in (timeout_s, LATE_TIMER_GRACE_S):
            self.waiter = self.loop.create_future()
            try:
                async with asyncio.timeout(grace):
                    await self.waiter
                return
            except TimeoutError:
                if self.wakes != seen:
                    return  # it arrived in the same loop pass as the timer fired
                if self.loop.time() - due < LATE_TIMER_S:
                    break
            finally:
                self.waiter = None
        self._fail(UpstreamFailure("node timed out", timeout=True))

    def take(self) -> bytes | None:
        """Everything received so far, as one piece (several SSE events relay in one send)."""
        chunks = self.chunks
        if not chunks:
            return None
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport:
            self.paused = False
            self.transport.resume_reading()
        return data

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """An answer whose headers arrived; the body is read or relayed by the caller."""

    def __init__(self, upstream: Upstream, origin: Origin, conn: _Connection, deadline: float):
        self._upstream = upstream
        self._origin = origin
        self._conn = conn
        self._deadline = deadline
        self._finished = False
        self.status = conn.status
        self.headers = conn.headers
        content_type = next((v for k, v in conn.headers if k == b"content-type"), b"")
        self.is_event_stream = content_type.startswith(b"text/event-stream")

    def relay_headers(self, *, keep_length: bool) -> list[tuple[bytes, bytes]]:
        return [
            (k, v)
            for k, v in self.headers
            if k not in DROP_RESPONSE or (keep_length and k == b"content-length")
        ]

    def _silence_s(self) -> float:
        remaining = self._deadline - self._conn.loop.time()
        if remaining <= 0:
            self._conn._fail(UpstreamFailure("node timed out (request timeout)", timeout=True))
        return max(min(self._upstream.timeouts.first_byte_s, remaining), 0.0)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (each read as soon as it is there, not re-framed)."""
        conn = self._conn
        while True:
            data = conn.take()
            if data is not None:
                yield data
                continue
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                self._finish()
                return
            await conn.wait(self._silence_s())

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._upstream._give_back(self._origin, self._conn)

    def close(self) -> None:
        """Done with the answer: a fully read one frees its connection, else it is dropped."""
        if self._finished:
            return
        self._finished = True
        if self._conn.complete and self._conn.error is None and not self._conn.chunks:
            self._upstream._give_back(self._origin, self._conn)
        else:
            self._conn.abort()


class Upstream:
    """A pooled keep-alive HTTP/1.1 client for all nodes."""

    def __init__(self, timeouts: Timeouts, *, ca_bundle: str | None = None) -> None:
        self.timeouts = timeouts
        self._ca_bundle = ca_bundle
        self._verified: ssl.SSLContext | None = None
        self._unverified: ssl.SSLContext | None = None
        self._idle: dict[Origin, list[_Connection]] = {}
        self._origins: dict[tuple[str, bool, str | None], Origin] = {}

    def _origin(self, node: Node) -> Origin:
        key = (node.url, node.insecure, node.api_key)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = origin_of(node.url, node.insecure, node.api_key)
        return origin

    def _tls(self, origin: Origin) -> ssl.SSLContext:
        """Certificates are verified (system CAs, or --upstream-ca-bundle) unless the node
        was registered as insecure."""
        if origin.insecure:
            if self._unverified is None:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                self._unverified = context
            return self._unverified
        if self._verified is None:
            self._verified = ssl.create_default_context(cafile=self._ca_bundle)
        return self._verified

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()

    def _give_back(self, origin: Origin, conn: _Connection) -> None:
        if conn.closed or not conn.keep_alive or conn.error is not None:
            conn.abort()
            return
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= IDLE_PER_ORIGIN:
            conn.abort()
            return
        conn._reset_exchange()
        conn.reused = True
        idle.append(conn)

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        context = self._tls(origin) if origin.scheme == "https" else None
        try:
            for attempt in range(2):
                due = loop.time() + self.timeouts.connect_s
                try:
                    async with asyncio.timeout(self.timeouts.connect_s):
                        _, protocol = await loop.create_connection(
                            lambda: _Connection(loop),
                            origin.host,
                            origin.port,
                            ssl=context,
                            server_hostname=origin.host if context else None,
                        )
                    break
                except TimeoutError:
                    # A timer this late means the process was not running (see
                    # _Connection.wait), not that the node was slow: connect once more.
                    if attempt or loop.time() - due < LATE_TIMER_S:
                        raise
        except TimeoutError:
            raise UpstreamFailure("connect timed out", timeout=True, sent=False) from None
        except ssl.SSLError as exc:
            raise UpstreamFailure(
                f"TLS handshake failed: {exc.reason or exc}", sent=False
            ) from None
        except OSError as exc:
            raise UpstreamFailure(f"cannot connect: {exc.strerror or exc}", sent=False) from None
        return protocol

    async def send(
        self,
        node: Node,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        request_id: str,
        *,
        query: bytes = b"",
        traceparent: bytes | None = None,
    ) -> UpstreamResponse:
        """Send one request to ``node`` and return once its headers arrived. ``traceparent``
        replaces the client's (None: the client's goes to the node unchanged)."""
        origin = self._origin(node)
        if origin.refusal:
            raise UpstreamFailure(origin.refusal, sent=False)
        target = origin.prefix + path.encode() + (b"?" + query if query else b"")
        head = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", origin.host_header]
        drop = DROP_REQUEST if traceparent is None else DROP_TRACED
        for name, value in headers:
            if name not in drop:
                head += (b"\r\n", name, b": ", value)
        head += (b"\r\nx-request-id: ", request_id.encode())
        if traceparent is not None:
            head += (b"\r\ntraceparent: ", traceparent)
        if origin.authorization:
            head.append(origin.authorization)
        if body or method != "GET":
            head += (b"\r\ncontent-length: ", str(len(body)).encode())
        head.append(b"\r\n\r\n")
        payload = b"".join(head) + body
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.request_s
        written = False  # the request went out on a connection that then failed
        for _ in range(2):
            try:
                conn = await self._connect(origin)
            except UpstreamFailure as exc:
                exc.sent = written  # an earlier write may have reached a node that then died
                raise
            assert conn.transport is not None
            conn.transport.write(payload)
            written = True
            wait_s = min(self.timeouts.first_byte_s, self.timeouts.request_s)
            try:
                while not conn.headers_done and conn.error is None:
                    await conn.wait(wait_s)
            except BaseException:
                conn.abort()  # cancelled (client gone): the node sees the connection drop
                raise
            if conn.headers_done:
                return UpstreamResponse(self, origin, conn, deadline)
            error = conn.error
            assert error is not None
            if conn.reused and not conn.received_any and not error.timeout:
                continue  # the node had closed this idle connection: the request never ran
            raise error
        raise UpstreamFailure("node closed the connection twice")

    async def control(
        self, node: Node, method: str, path: str, body: bytes = b"", timeout_s: float = 5.0
    ) -> tuple[int, bytes]:
        """A small control-plane call to a node (not routed, not retried): status and body."""
        headers = ((b"content-type", b"application/json"),) if body else ()
        try:
            async with asyncio.timeout(timeout_s):
                response = await self.send(node, method, path, headers, body, "fleetgate-control")
                try:
                    return response.status, await response.read()
                finally:
                    response.close()
        except TimeoutError:
            raise UpstreamFailure(f"{method} {path} timed out", timeout=True) from None

    async def get_json(self, node: Node, path: str, timeout_s: float = 5.0) -> object:
        """A small control-plane GET (a node's model list); raises :class:`UpstreamFailure`."""
        status, body = await self.control(node, "GET", path, timeout_s=timeout_s)
        if status != 200:
            raise UpstreamFailure(f"GET {path} answered {status}")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamFailure(f"GET {path} did not answer JSON") from None
