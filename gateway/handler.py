"""The OpenAI request path, as raw ASGI: read the body once, route, relay, release.

Only ``model`` and ``stream`` are decoded; the original bytes go upstream untouched. A failed
attempt is retried on another node only while nothing has reached the client; after that a
failure ends the stream with an OpenAI-shaped SSE error event. A client disconnect cancels
the upstream request, and every lease is released in a ``finally`` shielded from that
cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from shared_state import Outcome, StateError, Store
from shared_state import limits as key_limits

from .accesslog import AccessLog
from .auth import Authenticator
from .errors import (
    BadRequest,
    BodyTooLarge,
    GatewayError,
    InvalidJSON,
    MethodNotAllowed,
    MissingModel,
    ModelNotFound,
    NoHealthyNode,
    RateLimited,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
    error_body,
    render,
    sse_error_event,
)
from .metrics import GatewayMetrics
from .proxy import Upstream, UpstreamFailure, UpstreamResponse
from .routing import RetryBudget, Route, Router

if TYPE_CHECKING:
    from .distserve import DistServe

log = logging.getLogger("fleetgate.request")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Any
Send = Any

PROXY_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
DISTSERVE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# Told when a node answered (its status), or failed (None) after the request went out or not.
Settle = Callable[[int | None, bool], Awaitable[None]]
RETRY_STATUSES = frozenset({429, 502, 503, 504})
WATCH_AFTER_S = 0.05  # when to start watching for a client disconnect
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
_JSON = b"application/json"


class RequestView(msgspec.Struct):
    """The only fields the gateway reads from a request body."""

    model: str | None = None
    stream: bool | None = None
    user: str | None = None  # the session key of session_affinity, after X-Session-ID


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


def outcome_of(status: int) -> Outcome:
    """How a final status counts for the node: 4xx is the client's doing, 5xx the node's."""
    if status >= 500:
        return Outcome.FAIL
    if status >= 400:
        return Outcome.NEUTRAL
    return Outcome.OK


class _Exchange:
    """What this request has sent so far."""

    __slots__ = (
        "attempts",
        "complete",
        "node_id",
        "route",
        "send",
        "session_key",
        "started",
        "status",
    )

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.complete = False
        self.attempts = 0
        self.route: Route | None = None
        self.session_key: str | None = None
        self.status = 0
        self.node_id = ""

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, more: bool = False) -> None:
        if not more:
            self.complete = True
        await self.send({"type": "http.response.body", "body": data, "more_body": more})


class ProxyHandler:
    """Serves POST /v1/chat/completions, /v1/completions and /v1/embeddings."""

    def __init__(
        self,
        router: Router,
        upstream: Upstream,
        auth: Authenticator,
        metrics: GatewayMetrics,
        *,
        max_body_bytes: int,
        max_attempts: int,
        access_log: AccessLog | None = None,
    ) -> None:
        self.router = router
        self.upstream = upstream
        self.auth = auth
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_attempts = max_attempts
        self.access_log = access_log
        self.budget = RetryBudget()
        self.distserve: DistServe | None = None  # set when serving DistServe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started_at = time.perf_counter()
        request_id = request_id_of(scope["headers"])
        exchange = _Exchange(send)
        model = ""
        slot: _KeySlot | None = None  # a client key's concurrency slot
        try:
            if scope["method"] != "POST":
                error = MethodNotAllowed(f"{scope['method']} is not allowed here; use POST")
                error.headers = ((b"allow", b"POST"),)
                raise error
            headers = scope["headers"]
            key = await self.auth.check_client(headers)
            if key is not None:  # a stored key: its limits, if it has any
                slot = await self._check_key_limits(key, request_id)
                if slot is not None:
                    exchange.send = slot.freeing(send)
            _check_content_type(headers)
            body = await self._read_body(headers, receive)
            view = _decode(body)
            model = view.model or ""
            exchange.session_key = _session_key(headers) or view.user
            self.budget.on_request()
            await self._serve_watching(scope, receive, exchange, body, model, request_id)
        except ClientGone:
            self.metrics.disconnects.inc()
        except (GatewayError, StateError) as exc:
            await self._send_error(exchange, exc, request_id)
        except Exception as exc:
            log.exception("request %s failed", request_id)
            await self._send_error(exchange, exc, request_id)
        finally:
            # Only models a node answered for become labels: clients cannot grow the metrics.
            model = model if exchange.node_id else ""
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
                self._log_access(scope, request_id, model, exchange, elapsed)
            if slot is not None:
                await slot.free()

    async def _check_key_limits(self, digest: str, request_id: str) -> _KeySlot | None:
        """Admit a request under its key's limits (:class:`RateLimited` when over one);
        returns the concurrency slot to free when the request ends, if it took one."""
        store = self.router.store
        decision = await key_limits.admit(store, digest, self.router.replica, request_id)
        if decision is None:
            return None
        if not decision.allowed:
            raise RateLimited(decision)
        return _KeySlot(store, digest, decision) if decision.leased else None

    async def _send_error(self, exchange: _Exchange, exc: Exception, request_id: str) -> None:
        if exchange.started:
            return
        status, body, extra = render(exc)
        headers = [
            (b"content-type", _JSON),
            (b"content-length", str(len(body)).encode()),
            *extra,
        ]
        if exchange.route is not None:  # the last node tried, and why it was chosen
            headers.extend(self._headers(request_id, exchange.route, exchange))
        else:
            headers.append((b"x-request-id", request_id.encode()))
        with contextlib.suppress(OSError):
            await exchange.start(status, headers)
            await exchange.body(body)

    async def _read_body(self, headers: list[tuple[bytes, bytes]], receive: Receive) -> bytes:
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

    async def _serve_watching(
        self,
        scope: Scope,
        receive: Receive,
        exchange: _Exchange,
        body: bytes,
        model: str,
        request_id: str,
    ) -> None:
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
            if self.distserve is not None and scope["path"] in DISTSERVE_PATHS:
                await self.distserve.serve(self, scope, exchange, body, model, request_id)
            else:
                await self._route(scope, exchange, body, model, request_id)
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

    def may_retry(self) -> bool:
        """Whether the retry budget allows one more attempt (counted when it does)."""
        if not self.budget.try_spend():
            self.metrics.retry_budget_exhausted.inc()
            return False
        self.metrics.retries.inc()
        return True

    def no_node(self, model: str, role: str = "") -> GatewayError:
        """Why no node was picked: the model is unknown, or none of its nodes can serve now."""
        view = self.router.view()
        if view is None or not view.serves(model):
            return ModelNotFound(f"The model `{model}` does not exist.")
        kind = f"{role} node" if role else "node"
        return NoHealthyNode(f"no healthy {kind} can serve model `{model}` now")

    async def _route(
        self, scope: Scope, exchange: _Exchange, body: bytes, model: str, request_id: str
    ) -> None:
        tried: list[str] = []
        last_error: GatewayError | None = None
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1 and not self.may_retry():
                break
            route = await self.router.pick(
                model, f"{request_id}.{attempt}", tried, session_key=exchange.session_key
            )
            if route is None:
                if attempt == 1:
                    raise self.no_node(model)
                break
            tried.append(route.node.id)
            exchange.attempts, exchange.route = attempt, route
            final = attempt == self.max_attempts
            error = await self._attempt(scope, exchange, body, model, request_id, route, final)
            if error is None:
                return
            last_error = error
        raise last_error or self.no_node(model)

    async def _attempt(
        self,
        scope: Scope,
        exchange: _Exchange,
        body: bytes,
        model: str,
        request_id: str,
        route: Route,
        final: bool,
        settle: Settle | None = None,
    ) -> GatewayError | None:
        """One try on one node: ``None`` when the client got an answer, else the error.

        ``settle`` hears first how the node answered (DistServe decides there who frees the
        prefill session)."""
        node = route.node
        started_at = time.perf_counter()
        outcome = Outcome.NEUTRAL
        tokens = 0
        response: UpstreamResponse | None = None
        try:
            try:
                response = await self.upstream.send(
                    node,
                    "POST",
                    scope["path"],
                    scope["headers"],
                    body,
                    request_id,
                    query=scope.get("query_string", b""),
                )
            except UpstreamFailure as exc:
                outcome = Outcome.FAIL
                self.metrics.attempts.inc((("node", node.id), ("result", "error")))
                if settle is not None:
                    await settle(None, exc.sent)
                if exc.timeout:
                    return UpstreamTimeout(f"node {node.id} timed out")
                return UpstreamError(f"node {node.id} failed: {exc}")
            status = response.status
            # An engine may answer a stream's 200 before it starts the work: a stream is settled
            # by its first event instead.
            deferred = settle if status == 200 and response.is_event_stream else None
            if settle is not None and deferred is None:
                await settle(status, True)
            self.metrics.ttfb.observe((("model", model),), time.perf_counter() - started_at)
            if status in RETRY_STATUSES and not final:
                outcome = Outcome.NEUTRAL if status == 429 else Outcome.FAIL
                self.metrics.attempts.inc((("node", node.id), ("result", str(status))))
                return UpstreamError(f"node {node.id} answered {status}")
            exchange.node_id = node.id
            if response.is_event_stream:
                outcome, tokens = await self._relay_stream(
                    exchange, response, request_id, route, deferred
                )
            else:
                try:
                    data = await response.read()
                except UpstreamFailure as exc:
                    outcome = Outcome.FAIL
                    self.metrics.attempts.inc((("node", node.id), ("result", "error")))
                    return UpstreamTimeout(str(exc)) if exc.timeout else UpstreamError(str(exc))
                outcome = outcome_of(status)
                generated = status == 200 and scope["path"] != "/v1/embeddings"
                tokens = _completion_tokens(data) if generated else 0
                await self._send_buffered(exchange, response, data, request_id, route)
            self.metrics.attempts.inc((("node", node.id), ("result", str(status))))
            return None
        finally:
            if response is not None:
                response.close()
            release = self.router.release(route, outcome, time.perf_counter() - started_at, tokens)
            if exchange.complete:
                await release  # nothing can cancel a finished exchange: no shield task needed
            else:
                await asyncio.shield(release)

    def _headers(
        self, request_id: str, route: Route, exchange: _Exchange
    ) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-request-id", request_id.encode()),
            (b"x-fleetgate-node", route.node.id.encode()),
            (b"x-fleetgate-route", route.receipt(exchange.attempts).encode()),
        ]

    def _log_access(
        self, scope: Scope, request_id: str, model: str, exchange: _Exchange, elapsed_s: float
    ) -> None:
        """One JSON line per request: where it went and why (the route receipt)."""
        route = exchange.route
        client = scope.get("client")
        record: dict[str, Any] = {
            "t": round(time.time(), 3),
            "request_id": request_id,
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
        assert self.access_log is not None
        self.access_log.write(record)

    async def _send_buffered(
        self,
        exchange: _Exchange,
        response: UpstreamResponse,
        data: bytes,
        request_id: str,
        route: Route,
    ) -> None:
        status = response.status
        headers = response.relay_headers(keep_length=False)
        if status in (401, 403):
            # The client's key never reaches a node: a refusal is about the gateway's
            # credentials for that node, an upstream fault rather than the client's.
            data = error_body(
                f"node {route.node.id} refused the gateway's credentials ({status})",
                "upstream_error",
                "upstream_auth_error",
            )
            headers = [(b"content-type", _JSON)]
            status = 502
        elif status >= 400 and not _is_json(headers):
            # A node's plain-text error becomes an OpenAI-shaped one; never text/plain.
            text = data.decode("utf-8", "replace").strip()[:500]
            data = error_body(f"node answered {status}: {text}", "upstream_error", "upstream_error")
            headers = [
                (k, v) for k, v in headers if k not in (b"content-type", b"content-encoding")
            ]
            headers.append((b"content-type", _JSON))
            if status < 500:
                status = 502
        headers.append((b"content-length", str(len(data)).encode()))
        headers.extend(self._headers(request_id, route, exchange))
        await exchange.start(status, headers)
        await exchange.body(data)

    async def _relay_stream(
        self,
        exchange: _Exchange,
        response: UpstreamResponse,
        request_id: str,
        route: Route,
        settle: Settle | None = None,
    ) -> tuple[Outcome, int]:
        headers = response.relay_headers(keep_length=False)
        headers.extend(self._headers(request_id, route, exchange))
        await exchange.start(response.status, headers)
        events = 0
        try:
            async for chunk in response.chunks():
                if chunk:
                    if settle is not None:
                        await settle(502 if _is_error_event(chunk) else 200, True)
                        settle = None
                    events += chunk.count(b"data:")
                    await exchange.body(chunk, more=True)
            if settle is not None:
                await settle(None, True)  # ended without a single event
        except UpstreamFailure as exc:
            if settle is not None:
                await settle(None, True)
            self.metrics.stream_errors.inc((("node", route.node.id),))
            log.warning("stream %s from %s broke: %s", request_id, route.node.id, exc)
            await exchange.body(
                sse_error_event(f"the node failed mid-stream: {exc}", "upstream_stream_error"),
                more=True,
            )
            await exchange.body(b"")
            return Outcome.FAIL, 0
        await exchange.body(b"")
        # One event per token, then one that finishes the choice and "[DONE]": roughly.
        return outcome_of(response.status), max(0, events - 2)


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.match(text):
                return text
            break
    return os.urandom(12).hex()


def _is_error_event(chunk: bytes) -> bool:
    """Whether a stream's first event is an error object rather than a completion chunk."""
    first = chunk.split(b"\n\n", 1)[0]
    return b'"error"' in first and b'"choices"' not in first


def _session_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"x-session-id" and value:
            return value.decode("latin-1")[:256]
    return None


def _check_content_type(headers: list[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            if media != _JSON and not media.endswith(b"+json"):
                raise UnsupportedMediaType(
                    f"Content-Type {media.decode('latin-1')!r} is not supported; "
                    "send application/json"
                )
            return


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return b"json" in value.lower()
    return False


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Answer(msgspec.Struct):
    usage: _Usage | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


def _completion_tokens(data: bytes) -> int:
    """The tokens a buffered answer reports having generated (0 when it says nothing)."""
    try:
        usage = _decode_answer(data).usage
    except (msgspec.ValidationError, msgspec.DecodeError):
        return 0
    return usage.completion_tokens if usage is not None else 0


def _decode(body: bytes) -> RequestView:
    try:
        view = _decode_view(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request body: {exc}") from None
    except msgspec.DecodeError:
        raise InvalidJSON("request body is not valid JSON") from None
    if not view.model:
        raise MissingModel("you must provide a model parameter")
    return view
