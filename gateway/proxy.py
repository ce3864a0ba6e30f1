"""Upstream HTTP: the only module that talks to LLM nodes.

aiohttp is the client on the request path: on this machine kind it moved 5-10x the requests
of httpx's default transport at 32 concurrent calls (see DESIGN). Bodies are relayed as
bytes, never decoded, and compressed answers pass through unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp
import orjson

from shared_state import Node

# Hop-by-hop headers (RFC 9110 7.6.1) plus those the client library recomputes.
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
    }
)
# Credentials meant for the gateway: never forwarded to a node.
CLIENT_CREDENTIALS = frozenset({b"authorization", b"x-api-key", b"api-key", b"cookie"})
DROP_REQUEST = HOP_BY_HOP | CLIENT_CREDENTIALS
DROP_RESPONSE = HOP_BY_HOP | {b"date", b"server"}


class UpstreamFailure(Exception):
    """The node could not be reached, reset the connection, or timed out."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    first_byte_s: float
    request_s: float


class UpstreamResponse:
    """An answer whose headers arrived; the body is read or relayed by the caller."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        content_type = response.headers.get("content-type", "")
        self.is_event_stream = content_type.startswith("text/event-stream")
        self.headers = [(k.lower(), v) for k, v in response.raw_headers]

    def relay_headers(self, *, keep_length: bool) -> list[tuple[bytes, bytes]]:
        return [
            (k, v)
            for k, v in self.headers
            if k not in DROP_RESPONSE or (keep_length and k == b"content-length")
        ]

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _failure(exc) from None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (each read as soon as it is there, not re-framed)."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _failure(exc) from None

    def close(self) -> None:
        """Drop the connection (the answer was not fully read, so it cannot be reused)."""
        self._response.close()

    def release(self) -> None:
        self._response.release()


def _failure(exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamFailure("upstream timed out", timeout=True)
    return UpstreamFailure(f"upstream failed: {type(exc).__name__}: {exc}".rstrip(": "))


class Upstream:
    """A pooled keep-alive client for all nodes."""

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=timeouts.request_s,
            sock_connect=timeouts.connect_s,
            sock_read=timeouts.first_byte_s,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0, ttl_dns_cache=60, keepalive_timeout=30, enable_cleanup_closed=False
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        node: Node,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        request_id: str,
    ) -> UpstreamResponse:
        """Send one request to ``node`` and return once its headers arrived."""
        out: list[tuple[str, str]] = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k not in DROP_REQUEST
        ]
        out.append(("x-request-id", request_id))
        if node.api_key:
            out.append(("authorization", f"Bearer {node.api_key}"))
        try:
            response = await self.session.request(
                method, node.url + path, data=body, headers=out, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _failure(exc) from None
        return UpstreamResponse(response)

    async def get_json(self, node: Node, path: str, timeout_s: float = 5.0) -> object:
        """A small control-plane GET (a node's model list); raises :class:`UpstreamFailure`."""
        headers = {"authorization": f"Bearer {node.api_key}"} if node.api_key else {}
        try:
            async with self.session.get(
                node.url + path,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as response:
                body = await response.read()
                if response.status != 200:
                    raise UpstreamFailure(f"GET {path} answered {response.status}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _failure(exc) from None
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamFailure(f"GET {path} did not answer JSON") from None
