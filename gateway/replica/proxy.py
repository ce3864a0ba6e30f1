"""The OpenAI request path, as raw ASGI: check the client, read the body once, hand the request
to its :class:`~.exchange.Exchange`, and account for it whatever happens.

Only ``model``, ``stream`` and ``user`` are decoded (and, with ``cache_aware`` only, the prompt,
for its prefix chain); the original bytes go upstream untouched.
A client disconnect cancels the upstream work (the exchange releases every lease in a
``finally`` shielded from that cancellation); errors before the first byte are rendered once,
OpenAI-shaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from typing import Any

import msgspec
from starlette.types import Message, Receive, Scope, Send

from gateway.common.tracing import tracer
from shared_state import Priority, StateError, Store, StoreUnavailable, responses
from shared_state import limits as key_limits

from .accesslog import AccessLog
from .admission import PRIORITY_NAMES, Claim
from .auth import Authenticator
from .distserve import DistServe
from .endpoints import (
    Body,
    Endpoint,
    ResponseNotFound,
    multipart_boundary,
    multipart_field,
    reshape_error,
)
from .errors import (
    AmbiguousFraming,
    BadRequest,
    BodyTooLarge,
    GatewayError,
    InvalidJSON,
    MethodNotAllowed,
    MissingModel,
    NotFound,
    RateLimited,
    RequestTimeout,
    StoreDown,
    UnsupportedMediaType,
    render,
)
from .exchange import JSON, Exchange, Forwarder, Headers
from .prefix import PromptView, read_prompt
from .receipts import Receipts

log = logging.getLogger("fleetgate.request")

DISTSERVE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# gen_ai.operation.name of the paths OpenTelemetry's GenAI conventions name.
GENAI_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
}
WATCH_AFTER_S = 0.05  # when to start watching for a client disconnect
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


class RequestView(msgspec.Struct):
    """The only fields the gateway reads from a request body."""

    model: str | None = None
    stream: bool | None = None
    user: str | None = None  # the session key of session_affinity, after X-Session-ID
    previous_response_id: str | None = None  # the Responses API: the response it continues


_decode_view = msgspec.json.Decoder(RequestView).decode


class _KeySlot:
    """A client key's concurrency slot, freed once: just before the answer's last message goes
    out (so the client's next request finds it free), or when the request ends anyhow."""

    __slots__ = ("decision", "digest", "freed", "store")

    def __init__(self, store: Store, digest: str, decision: key_limits.LimitDecision) -> None:
        self.store = store
        self.digest = digest
        self.decision = decision
        self.freed = False

    async def free(self) -> None:
        if not self.freed:
            self.freed = True
            # Shielded: a request cancelled meanwhile still frees its slot.
            await asyncio.shield(key_limits.dismiss(self.store, self.digest, self.decision))

    def freeing(self, send: Send) -> Send:
        async def send_freeing(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await self.free()
            await send(message)

        return send_freeing


class ClientGone(Exception):
    """The client disconnected before the request was read."""


class ProxyHandler:
    """Serves POST /v1/chat/completions, /v1/completions and /v1/embeddings; DistServe, when
    given, serves the generating paths."""

    def __init__(
        self,
        forwarder: Forwarder,
        auth: Authenticator,
        *,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
        access_log: AccessLog | None = None,
        distserve: DistServe | None = None,
        prefix_block_bytes: int | None = None,
        receipts: Receipts | None = None,
    ) -> None:
        """``prefix_block_bytes``: with cache_aware, the block size of prompts' prefix chains
        (None: the prompt is never read); ``receipts``: where the latest requests' route
        receipts are kept for the status page."""
        self.forwarder = forwarder
        self.router = forwarder.router
        self.metrics = forwarder.metrics
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.access_log = access_log
        self.distserve = distserve
        self.prefix_block_bytes = prefix_block_bytes
        self.receipts = receipts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started_at = time.perf_counter()
        headers = scope["headers"]
        request_id = request_id_of(headers)
        exchange = Exchange(self.forwarder, scope, send, request_id)
        exchange.span = tracer().server(scope["method"], scope["path"], _route(exchange), headers)
        slot: _KeySlot | None = None  # a client key's concurrency slot
        body: bytes | None = None
        try:
            _check_framing(headers)
            endpoint = _endpoint(exchange)
            key = await self.auth.check_client(headers)
            exchange.claim = self._claim(headers, key)
            if key is not None:  # a stored key: its limits, if it has any
                slot = await self._check_key_limits(key, exchange.lease_name)
                if slot is not None:
                    exchange.send = slot.freeing(send)
            if endpoint.body is Body.JSON:
                _check_content_type(headers)
            elif endpoint.body is Body.MULTIPART:
                boundary = multipart_boundary(_header_bytes(headers, b"content-type"))
            try:
                # A body trickled in forever would hold the connection and the key's slot.
                async with asyncio.timeout(self.body_timeout_s):
                    body = await self._read_body(headers, receive)
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout_s:g} s"
                ) from None
            if endpoint.body is Body.JSON:
                view = self._read_view(body, exchange)
                exchange.model = view.model or ""
                exchange.session_key = _session_key(headers) or view.user
                if view.previous_response_id:
                    await self._pin(exchange, view.previous_response_id, "previous_response_id")
            elif endpoint.body is Body.MULTIPART:
                exchange.model = _form_model(body, boundary)
                exchange.session_key = _session_key(headers)
            else:
                assert exchange.endpoint is not None
                await self._pin(exchange, exchange.endpoint[1], None)
            self.forwarder.budget.on_request()
            await self._serve_watching(receive, exchange, body)
        except ClientGone:
            self.metrics.disconnects.inc()
        except (GatewayError, StateError) as exc:
            await self._send_error(exchange, exc, unread=body is None and _has_body(headers))
        except Exception as exc:
            log.exception("request %s failed", request_id)
            await self._send_error(exchange, exc, unread=body is None and _has_body(headers))
        finally:
            if exchange.span.recording:
                _trace_request(exchange)
            exchange.span.end()
            # Only models a node answered for become labels: clients cannot grow the metrics.
            model = exchange.model if exchange.node_id else ""
            labels = (
                ("node", exchange.node_id),
                ("model", model),
                ("status", str(exchange.status)),
            )
            self.metrics.requests.inc(labels)
            elapsed = time.perf_counter() - started_at
            if exchange.status:
                self.metrics.latency.observe((("model", model),), elapsed)
            if self.access_log is not None:
                self._log_access(exchange, model, elapsed)
            if self.receipts is not None:
                self._keep_receipt(exchange, elapsed)
            if slot is not None:
                await slot.free()

    async def _pin(self, exchange: Exchange, response_id: str, param: str | None) -> None:
        """Send ``exchange`` to the node that holds ``response_id``, whatever the strategy."""
        try:
            held = await responses.holder(
                self.router.store, response_id, self.forwarder.response_settings
            )
        except StoreUnavailable:
            raise StoreDown(
                f"cannot find which engine holds response `{response_id[:80]}`: the store is "
                "unreachable"
            ) from None
        if held is None:
            raise ResponseNotFound(
                f"Response with id '{response_id[:80]}' not found: no engine of this fleet is "
                "known to hold it (never stored, expired, or deleted).",
                param=param,
            )
        exchange.pinned = held.node_id
        if not exchange.model:
            exchange.model = held.model

    def _claim(self, headers: Headers, key: str | None) -> Claim:
        """The request's place in the fleet's queue: ``x-fleetgate-priority`` (else its key's
        default), never above its key's cap, and its key's fair share."""
        settings = None
        if key is not None:
            view = self.router.store.cached_view
            settings = view.registry.key_admission.get(key) if view is not None else None
        asked = _header(headers, b"x-fleetgate-priority")
        if asked is not None:
            priority = PRIORITY_NAMES.get(asked.strip().lower())
            if priority is None:
                raise BadRequest(
                    f"x-fleetgate-priority must be high, normal or low, not {asked[:40]!r}",
                    param="x-fleetgate-priority",
                )
        else:
            priority = settings.priority if settings is not None else Priority.NORMAL
        if settings is not None and settings.max_priority is not None:
            priority = max(priority, settings.max_priority)  # lower value: higher priority
        fair_key = key[:12] if key is not None else ""
        share = settings.share if settings is not None else 1
        return Claim(Priority(priority), fair_key, share)

    def _read_view(self, body: bytes, exchange: Exchange) -> RequestView | PromptView:
        """The request's routing fields; with cache_aware, its prompt's chain too."""
        if self.prefix_block_bytes is not None:
            read = read_prompt(body, exchange.scope["path"], self.prefix_block_bytes)
            if read is not None:
                view, exchange.prefix = read
                return view
        return _decode(body)

    async def _check_key_limits(self, digest: str, lease_name: str) -> _KeySlot | None:
        """Admit a request under its key's limits (:class:`RateLimited` when over one);
        returns the concurrency slot to free when the request ends, if it took one."""
        store = self.router.store
        decision = await key_limits.admit(store, digest, self.router.replica, lease_name)
        if decision is None:
            return None
        if not decision.allowed:
            raise RateLimited(decision)
        return _KeySlot(store, digest, decision) if decision.leased else None

    async def _send_error(self, exchange: Exchange, exc: Exception, *, unread: bool) -> None:
        """Answer ``exc``, OpenAI-shaped, unless the answer has begun. Refused with its body
        ``unread``, a request ends its connection: the server cannot take the next request
        on it, and says so, so that the client does not send one there."""
        if exchange.started:
            return
        status, body, extra = render(exc)
        body = reshape_error(exchange.dialect, status, body)
        headers = [
            (b"content-type", JSON),
            (b"content-length", str(len(body)).encode()),
            *extra,
        ]
        if unread and (b"connection", b"close") not in extra:
            headers.append((b"connection", b"close"))
        if exchange.route is not None:  # the last node tried, and why it was chosen
            headers.extend(exchange.route_headers(exchange.route))
        else:
            headers.append((b"x-request-id", exchange.request_id.encode()))
        with contextlib.suppress(OSError):
            await exchange.start(status, headers)
            await exchange.body(body)

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise BadRequest("invalid Content-Length header") from None
                if declared > limit:
                    raise BodyTooLarge(f"request body of {declared} bytes exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body exceeds {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _serve_watching(self, receive: Receive, exchange: Exchange, body: bytes) -> None:
        """Route the request; if the client goes away first, cancel the work.

        A watcher task cancels this task on ``http.disconnect``, but only while the answer is
        incomplete, so a finished exchange is never interrupted. It starts after
        ``WATCH_AFTER_S``: most answers are done sooner, and a task per request costs.
        """
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        gone = False
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            nonlocal gone
            await _wait_disconnect(receive)
            if not exchange.complete:
                gone = True
                task.cancel()

        def start_watching() -> None:
            nonlocal watcher
            if not exchange.complete:
                watcher = loop.create_task(watch())

        timer = loop.call_later(WATCH_AFTER_S, start_watching)
        try:
            if self.distserve is not None and exchange.scope["path"] in DISTSERVE_PATHS:
                await self.distserve.serve(exchange, body)
            else:
                await exchange.forward(body)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()
            self.metrics.disconnects.inc()
        finally:
            exchange.complete = True
            timer.cancel()
            if watcher is not None:
                watcher.cancel()

    def _log_access(self, exchange: Exchange, model: str, elapsed_s: float) -> None:
        """One JSON line per request: where it went and why (the route receipt)."""
        route = exchange.route
        scope = exchange.scope
        client = scope.get("client")
        record: dict[str, Any] = {
            "t": round(time.time(), 3),
            "request_id": exchange.request_id,
            "client": client[0] if client else None,
            "path": scope["path"],
            "model": model or None,
            "status": exchange.status,
            "ms": round(elapsed_s * 1000, 2),
            "attempts": exchange.attempts,
        }
        if route is not None:
            record.update(
                node=route.node.id,
                strategy=route.strategy,
                candidates=route.eligible,
                score=route.score,
                epoch=route.epoch,
                state="local" if route.local else "shared",
            )
            if route.queued_ms is not None:
                record["queued_ms"] = round(route.queued_ms, 1)
                record["priority"] = exchange.claim.priority.name.lower()
            if route.chain is not None:
                record["prefix"] = [
                    None if route.local else route.prefix_matched,
                    len(route.chain.blocks),
                ]
        assert self.access_log is not None
        self.access_log.write(record)

    def _keep_receipt(self, exchange: Exchange, elapsed_s: float) -> None:
        """The request as the status page lists it: what the access log says, in short."""
        assert self.receipts is not None
        route = exchange.route
        self.receipts.record(
            t_ms=int(time.time() * 1000),
            request_id=exchange.request_id,
            path=exchange.scope["path"],
            model=exchange.model[:200] or None,
            node=route.node.id if route is not None else None,
            status=exchange.status,
            ms=round(elapsed_s * 1000, 2),
            attempts=exchange.attempts,
            route=route,
        )


def _route(exchange: Exchange) -> str:
    """The request's route for traces: its path, a by-id call's id as ``{response_id}``."""
    found = exchange.endpoint
    if found is None:
        return ""
    path: str = exchange.scope["path"]
    return path.replace(found[1], "{response_id}", 1) if found[1] else path


def _trace_request(exchange: Exchange) -> None:
    """The server span's attributes once the request is over (HTTP's and GenAI's semantic
    conventions, and the gateway's own); a 5xx marks it failed."""
    span = exchange.span
    route = exchange.route
    span.update(
        {
            "http.response.status_code": exchange.status or None,
            "gen_ai.operation.name": GENAI_OPERATIONS.get(exchange.scope["path"]),
            "gen_ai.request.model": exchange.model[:200] or None,
            "fleetgate.request_id": exchange.request_id,
            "fleetgate.node": exchange.node_id or None,
            "fleetgate.attempts": exchange.attempts,
            "fleetgate.priority": exchange.claim.priority.name.lower()
            if route is not None and route.queued_ms is not None
            else None,
        }
    )
    if exchange.status >= 500:
        span.fail(str(exchange.status))


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def request_id_of(headers: Headers) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.match(text):
                return text
            break
    return os.urandom(12).hex()


def _endpoint(exchange: Exchange) -> Endpoint:
    """The request's endpoint, its method allowed (else 405 with Allow)."""
    found = exchange.endpoint
    method = exchange.scope["method"]
    if found is None:
        raise NotFound(f"no route {exchange.scope['path']}")
    endpoint = found[0]
    if method not in endpoint.methods:
        allowed = ", ".join(sorted(endpoint.methods))
        error = MethodNotAllowed(f"{method} is not allowed here; use {allowed}")
        error.headers = ((b"allow", allowed.encode()),)
        raise error
    return endpoint


def _form_model(body: bytes, boundary: bytes) -> str:
    model = multipart_field(body, boundary, b"model")
    if not model:
        raise MissingModel("you must provide a model parameter (a form field)")
    return model


def _header_bytes(headers: Headers, wanted: bytes) -> bytes:
    for name, value in headers:
        if name == wanted:
            return value
    return b""


def _header(headers: Headers, wanted: bytes) -> str | None:
    for name, value in headers:
        if name == wanted:
            return value.decode("latin-1")
    return None


def _session_key(headers: Headers) -> str | None:
    for name, value in headers:
        if name == b"x-session-id" and value:
            return value.decode("latin-1")[:256]
    return None


def framed_twice(headers: Headers) -> bool:
    """Whether a request carries both Content-Length and Transfer-Encoding (RFC 9112 6.3): a
    front proxy may have found its body's end elsewhere, smuggling the bytes after it in as a
    request of their own. Such a request is refused on every path, and its connection closed."""
    length = coding = False
    for name, _ in headers:
        if name == b"content-length":
            length = True
        elif name == b"transfer-encoding":
            coding = True
    return length and coding


def closing_unread(scope: Scope, receive: Receive, send: Send) -> tuple[Receive, Send]:
    """Wrap a request's channels so that an answer begun before its body was read whole says
    ``connection: close``: the server then drops the connection (the next request cannot be
    found in it), and a client not told so would send its next request there."""
    if not _has_body(scope["headers"]):
        return receive, send
    read = False

    async def receive_noting() -> Message:
        nonlocal read
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            read = True
        return message

    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start" and not read:
            message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
        await send(message)

    return receive_noting, send_closing


def _has_body(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _check_framing(headers: Headers) -> None:
    if framed_twice(headers):
        raise AmbiguousFraming("a request must not carry both Content-Length and Transfer-Encoding")


def _check_content_type(headers: Headers) -> None:
    for name, value in headers:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            if media != JSON and not media.endswith(b"+json"):
                raise UnsupportedMediaType(
                    f"Content-Type {media.decode('latin-1')!r} is not supported; "
                    "send application/json"
                )
            return


def _decode(body: bytes) -> RequestView:
    try:
        view = _decode_view(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request body: {exc}") from None
    except msgspec.DecodeError:
        raise InvalidJSON("request body is not valid JSON") from None
    except RecursionError:  # msgspec's depth limit is Python's recursion limit
        raise InvalidJSON("request body is nested too deeply") from None
    if not view.model:
        raise MissingModel("you must provide a model parameter")
    return view
