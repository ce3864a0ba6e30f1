"""The gateway's upstream HTTP/1.1 client against raw loopback servers that misbehave."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import pytest

from gateway.replica.upstream import Timeouts, Upstream, UpstreamFailure
from shared_state import Node

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


class RawServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Node:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return Node(
            id=f"http://127.0.0.1:{port}",
            url=f"http://127.0.0.1:{port}",
            models=("m",),
            api_key="node-key",
        )

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    client = Upstream(Timeouts(connect_s=1.0, first_byte_s=1.0, request_s=5.0))
    yield client
    await client.close()


async def post(
    upstream: Upstream, node: Node, headers: Iterable[tuple[bytes, bytes]] = ()
) -> tuple[int, bytes]:
    response = await upstream.send(node, "POST", "/v1/chat/completions", headers, b'{"a":1}', "rid")
    try:
        return response.status, await response.read()
    finally:
        response.close()


async def test_request_carries_node_key_not_client_credentials(upstream: Upstream) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await read_request(reader)
        seen.append(head + body)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read(1)

    async with RawServer(handler) as node:
        client_headers = [
            (b"authorization", b"Bearer client"),
            (b"x-api-key", b"client"),
            (b"connection", b"keep-alive"),
            (b"x-custom", b"yes"),
            (b"content-type", b"application/json"),
        ]
        assert await post(upstream, node, client_headers) == (200, b"ok")
    text = seen[0].decode().lower()
    assert "authorization: bearer node-key" in text and "client" not in text
    assert "x-custom: yes" in text and "x-request-id: rid" in text
    assert "content-length: 7" in text and text.endswith('{"a":1}')
    assert text.startswith("post /v1/chat/completions http/1.1\r\nhost: 127.0.0.1:")


async def test_keep_alive_reuses_and_survives_a_node_closing_idle_connections(
    upstream: Upstream,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        # Closes the idle keep-alive connection right after answering, without saying so.

    server = RawServer(handler)
    async with server as node:
        for _ in range(5):
            assert await post(upstream, node) == (200, b"ok")
            await asyncio.sleep(0.01)
    assert server.connections == 5  # each stale connection was replaced, no request failed


async def test_pooled_connection_is_reused(upstream: Upstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    server = RawServer(handler)
    async with server as node:
        for _ in range(5):
            assert await post(upstream, node) == (200, b"ok")
    assert server.connections == 1


async def test_chunked_interim_and_connection_close(upstream: Upstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n"
            b"content-type: text/event-stream\r\n\r\n"
        )
        for event in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    server = RawServer(handler)
    async with server as node:
        response = await upstream.send(node, "POST", "/v1/x", [], b"{}", "r")
        assert response.status == 200 and response.is_event_stream
        events = b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        assert b"".join([c async for c in response.chunks()]) == events
        response.close()
        assert await post(upstream, node) == (200, events)  # on a new connection: "close"
    assert server.connections == 2


async def test_stream_cut_midway_and_malformed_answers_fail(upstream: Upstream) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.transport.abort()

    async with RawServer(cut) as node:
        response = await upstream.send(node, "POST", "/v1/x", [], b"{}", "r")
        with pytest.raises(UpstreamFailure, match="closed"):
            [c async for c in response.chunks()]
        response.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"this is not http\r\n\r\n")
        await writer.drain()

    async with RawServer(garbage) as node:
        with pytest.raises(UpstreamFailure, match="malformed"):
            await post(upstream, node)


async def test_silent_node_times_out_and_refused_connection_fails(upstream: Upstream) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(3)

    async with RawServer(silent) as node:
        with pytest.raises(UpstreamFailure) as failure:
            await post(upstream, node)
        assert failure.value.timeout

    closed = Node(id="http://127.0.0.1:1", url="http://127.0.0.1:1", models=("m",))
    with pytest.raises(UpstreamFailure, match="cannot connect") as failure:
        await post(upstream, closed)
    assert not failure.value.timeout


async def test_an_answer_that_arrived_while_the_process_was_paused_is_read(
    upstream: Upstream,
) -> None:
    """A replica paused (SIGSTOP, a frozen VM, a blocked loop) past the first-byte timeout
    wakes with that timer due before it reads the answer that arrived meanwhile: the answer
    is read, not called a timeout (a paused replica's streams got 504s)."""
    answered = threading.Event()

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            time.sleep(0.2)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            answered.set()
            time.sleep(3)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=serve, args=(listener,), daemon=True)
        thread.start()
        node = Node(id=f"http://127.0.0.1:{port}", url=f"http://127.0.0.1:{port}", models=("m",))
        # The loop stops running 0.1 s into the wait, for longer than the 1 s timeout.
        asyncio.get_running_loop().call_later(0.1, time.sleep, 1.5)
        assert await post(upstream, node) == (200, b"ok")
        assert answered.is_set()
        thread.join(5)


async def test_a_connection_made_while_the_process_was_paused_is_used(
    upstream: Upstream,
) -> None:
    """A replica paused past the connect timeout while connecting (the kernel completed the
    connection meanwhile) uses it, instead of calling the connect timed out (a 504)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async with RawServer(answer) as node:
        # The loop stops running as the connect starts, for longer than the 1 s timeout.
        asyncio.get_running_loop().call_soon(time.sleep, 1.5)
        assert await post(upstream, node) == (200, b"ok")


async def test_large_body_is_read_whole_through_backpressure(upstream: Upstream) -> None:
    blob = bytes(range(256)) * (12 * 1024)  # 3 MiB, above the pause threshold

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(blob))
        writer.write(blob)
        await writer.drain()
        await reader.read(1)

    async with RawServer(big) as node:
        assert await post(upstream, node) == (200, blob)
