"""One client request's exchange with the nodes: what has reached the client, one attempt on one
node, and the retry loop. Shared by the Hybrid path (:meth:`Exchange.forward`) and DistServe.

A failed attempt is retried on another node only while nothing has reached the client; after
that a failure ends the stream with an OpenAI-shaped SSE error event. Every lease taken by an
attempt is released in a ``finally``, shielded from cancellation unless the exchange is complete.
With cache_aware, the release carries the answer's cached prompt tokens when the node reported
them (a buffered answer's usage, or a stream's usage event).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable

import msgspec
from starlette.types import Message, Scope, Send

from gateway.common.tracing import NO_SPAN, Span, tracer
from shared_state import NodeState, Outcome, StateError, StoreUnavailable, UnknownNode, responses

from .admission import Claim
from .endpoints import Dialect, ResponseEngineUnavailable, endpoint_of, stream_error_event
from .errors import (
    GatewayError,
    ModelNotFound,
    NoHealthyNode,
    UpstreamError,
    UpstreamTimeout,
    error_body,
)
from .metrics import GatewayMetrics
from .prefix import PrefixChain
from .routing import RetryBudget, Route, Router
from .upstream import Upstream, UpstreamFailure, UpstreamResponse

log = logging.getLogger("fleetgate.request")

Headers = list[tuple[bytes, bytes]]
# Told when a node answered (its status), or failed (None) after the request went out or not.
Settle = Callable[[int | None, bool], Awaitable[None]]
# One attempt of a request: None when the client got an answer, else why it failed.
Attempt = Callable[[int], Awaitable[GatewayError | None]]
RETRY_STATUSES = frozenset({429, 502, 503, 504})
JSON = b"application/json"
# A stream event's text, not empty: one per generated token in every engine's stream, whatever
# comes around them (vLLM's and llama.cpp's role-only opening chunk, an empty finishing chunk
# or none, a usage chunk). "reasoning_content" does not match: its quote is not before "content".
_TOKEN_TEXT = re.compile(rb'"(?:content|text)"\s*:\s*"[^"]')


def outcome_of(status: int) -> Outcome:
    """How a final status counts for the node: 4xx is the client's doing, 5xx the node's."""
    if status >= 500:
        return Outcome.FAIL
    if status >= 400:
        return Outcome.NEUTRAL
    return Outcome.OK


class NoNode(Exception):
    """No node (of ``role``, when one is named) can take this attempt now."""

    def __init__(self, role: str = "") -> None:
        super().__init__(role or "node")
        self.role = role


class Forwarder:
    """What every exchange of one replica shares: routing, the upstream client, metrics, the
    retry budget and the attempt limit."""

    def __init__(
        self, router: Router, upstream: Upstream, metrics: GatewayMetrics, *, max_attempts: int
    ) -> None:
        self.router = router
        self.upstream = upstream
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.budget = RetryBudget()
        self.response_settings = responses.ResponseSettings()

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


class Exchange:
    """The state of one request: its identity, and what has been sent to the client."""

    __slots__ = (
        "attempts",
        "claim",
        "complete",
        "dialect",
        "endpoint",
        "forwarder",
        "lease_name",
        "model",
        "node_id",
        "pinned",
        "prefix",
        "request_id",
        "route",
        "scope",
        "send",
        "session_key",
        "span",
        "started",
        "status",
    )

    def __init__(self, forwarder: Forwarder, scope: Scope, send: Send, request_id: str) -> None:
        self.forwarder = forwarder
        self.scope = scope
        self.send = send
        self.request_id = request_id
        # Leases are named by the gateway, never by the client's X-Request-ID: requests that
        # share one must still hold a lease each on their node and their key.
        self.lease_name = os.urandom(9).hex()
        self.model = ""
        self.session_key: str | None = None
        self.prefix: PrefixChain | None = None  # cache_aware: the prompt's chain
        self.claim = Claim()  # its place in the fleet's queue, should it have to wait
        self.endpoint = endpoint_of(scope["path"], scope["method"])
        self.dialect = self.endpoint[0].dialect if self.endpoint else Dialect.OPENAI
        self.pinned: str | None = None  # the node holding the response this request names
        self.started = False
        self.complete = False
        self.attempts = 0
        self.route: Route | None = None
        self.status = 0
        self.node_id = ""  # the node whose answer the client got
        self.span: Span = NO_SPAN  # the request's server span (tracing on)

    # -- towards the client ---------------------------------------------------------------

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        self.status = status
        message: Message = {"type": "http.response.start", "status": status, "headers": headers}
        await self.send(message)

    async def body(self, data: bytes, more: bool = False) -> None:
        if not more:
            self.complete = True
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    def route_headers(self, route: Route) -> Headers:
        """The request id, the node that answered and the route receipt."""
        return [
            (b"x-request-id", self.request_id.encode()),
            (b"x-fleetgate-node", route.node.id.encode()),
            (b"x-fleetgate-route", route.receipt(self.attempts).encode()),
        ]

    async def send_buffered(self, response: UpstreamResponse, data: bytes, route: Route) -> None:
        """Relay a whole upstream answer, its errors made OpenAI-shaped."""
        self.node_id = route.node.id
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
            headers = [(b"content-type", JSON)]
            status = 502
        elif status >= 400 and not _is_json(headers):
            # A node's plain-text error becomes an OpenAI-shaped one; never text/plain.
            text = data.decode("utf-8", "replace").strip()[:500]
            data = error_body(f"node answered {status}: {text}", "upstream_error", "upstream_error")
            headers = [
                (k, v) for k, v in headers if k not in (b"content-type", b"content-encoding")
            ]
            headers.append((b"content-type", JSON))
            if status < 500:
                status = 502
        headers.append((b"content-length", str(len(data)).encode()))
        headers.extend(self.route_headers(route))
        await self.start(status, headers)
        await self.body(data)

    async def _relay_stream(
        self, response: UpstreamResponse, route: Route, settle: Settle | None
    ) -> tuple[Outcome, int, bytes]:
        """Relay an event stream: its outcome, its tokens, and the last chunk that carried a
        usage (with its event's start, which may have come in the chunk before)."""
        headers = response.relay_headers(keep_length=False)
        headers.extend(self.route_headers(route))
        await self.start(response.status, headers)
        texts = 0
        usage = previous = b""
        recording = self.records_response
        try:
            async for chunk in response.chunks():
                if recording and chunk:
                    # Known before the client can name it in its next turn, on any replica.
                    recording = not await self._record_response(_created_id(previous + chunk))
                if chunk:
                    if settle is not None:
                        await settle(502 if _is_error_event(chunk) else 200, True)
                        settle = None
                    texts += _token_texts(chunk)
                    if b'"usage"' in chunk:  # its event may have begun in the chunk before
                        usage = previous + chunk
                    previous = chunk
                    await self.body(chunk, more=True)
            if settle is not None:
                await settle(None, True)  # ended without a single event
        except UpstreamFailure as exc:
            if settle is not None:
                await settle(None, True)
            self.forwarder.metrics.stream_errors.inc((("node", route.node.id),))
            log.warning("stream %s from %s broke: %s", self.request_id, route.node.id, exc)
            await self.body(
                stream_error_event(
                    self.dialect, f"the node failed mid-stream: {exc}", "upstream_stream_error"
                ),
                more=True,
            )
            await self.body(b"")
            return Outcome.FAIL, 0, b""
        await self.body(b"")
        # The node's own count when it sent a usage (stream_options.include_usage; llama.cpp's
        # completions always do); else the events that carried text, one per token (events
        # alone would count vLLM's role-only opening, and miss its completions' absent
        # finishing event). Roughly: a text cut between two chunks right after its quote is
        # missed.
        counted = _stream_usage(usage) if usage else None
        tokens = counted.completion_tokens if counted is not None else texts
        return outcome_of(response.status), tokens, usage

    # -- the Responses API's state ---------------------------------------------------------

    @property
    def records_response(self) -> bool:
        return self.endpoint is not None and self.endpoint[0].records_response

    @property
    def forgets_response(self) -> bool:
        return self.endpoint is not None and self.endpoint[0].forgets_response

    async def _record_response(self, response_id: str | None) -> bool:
        """Record which node holds the response this answer made; whether there was one."""
        route = self.route
        if not response_id or route is None:
            return False
        try:
            await responses.record(
                self.forwarder.router.store,
                response_id,
                route.node.id,
                self.model,
                self.forwarder.response_settings,
            )
        except (StoreUnavailable, StateError) as exc:
            log.warning("response %s of %s not recorded: %s", response_id, route.node.id, exc)
        return True

    async def _forget_response(self) -> None:
        if self.endpoint is not None and self.endpoint[1]:
            with contextlib.suppress(StoreUnavailable, StateError):
                await responses.forget(self.forwarder.router.store, self.endpoint[1])

    async def _pinned_trouble(self) -> str:
        """Why the node holding the response named by this request cannot take it."""
        node_id = self.pinned or ""
        what = f"the engine that holds this response ({node_id})"
        try:
            node = await self.forwarder.router.store.get_node(node_id)
        except UnknownNode:
            return f"{what} is no longer registered; the response cannot be continued elsewhere"
        except (StoreUnavailable, StateError):
            return f"{what} cannot be reached now"
        if node.state is not NodeState.ACTIVE:
            return f"{what} is {node.state.value}; the response cannot be continued elsewhere"
        if self.model and self.model not in node.models:
            return f"{what} does not serve model `{self.model}`"
        return f"{what} cannot take requests now (ejected or at capacity); retry later"

    # -- towards the nodes ----------------------------------------------------------------

    async def retry(self, one: Attempt) -> None:
        """Run ``one(attempt)`` for attempts 1, 2, ... until it answers the client, the attempts
        or the retry budget run out (raising the last error), or no node is left to try."""
        forwarder = self.forwarder
        last_error: GatewayError | None = None
        for attempt in range(1, forwarder.max_attempts + 1):
            if attempt > 1 and not forwarder.may_retry():
                self.span.set("fleetgate.retry.stopped", "retry budget exhausted")
                break
            try:
                error = await one(attempt)
            except NoNode as none:
                if attempt == 1:
                    raise forwarder.no_node(self.model, none.role) from None
                self.span.set("fleetgate.retry.stopped", "no other node")
                break
            if error is None:
                return
            last_error = error
        raise last_error or forwarder.no_node(self.model)

    async def forward(self, body: bytes) -> None:
        """The Hybrid path: each attempt on another node picked by the replica's strategy."""
        tried: list[str] = []
        router = self.forwarder.router

        async def one(attempt: int) -> GatewayError | None:
            with tracer().span("fleetgate.pick") as picking:
                route = await router.pick(
                    self.model,
                    f"{self.lease_name}.{attempt}",
                    tried,
                    session_key=self.session_key,
                    chain=self.prefix,
                    claim=self.claim,
                    only=self.pinned,
                )
                _trace_route(picking, route)
            if route is None and self.pinned is not None:
                if attempt == 1:
                    raise ResponseEngineUnavailable(await self._pinned_trouble())
                raise NoNode
            if route is None:
                raise NoNode
            tried.append(route.node.id)
            return await self.attempt(route, attempt, body)

        await self.retry(one)

    async def attempt(
        self, route: Route, attempt: int, body: bytes, settle: Settle | None = None
    ) -> GatewayError | None:
        """Attempt ``attempt`` on ``route``'s node, releasing its lease after: ``None`` when the
        client got an answer, else the error. ``settle`` hears first how the node answered
        (DistServe decides there who frees the prefill session)."""
        forwarder = self.forwarder
        metrics = forwarder.metrics
        self.attempts, self.route = attempt, route
        final = attempt == forwarder.max_attempts
        scope = self.scope
        node = route.node
        started_at = time.perf_counter()
        outcome = Outcome.NEUTRAL
        tokens = 0
        cached: tuple[int, int] | None = None  # the answer's prompt and cached tokens
        response: UpstreamResponse | None = None
        span = tracer().upstream(scope["method"], node.id, node.url, scope["path"], attempt)
        try:
            try:
                response = await forwarder.upstream.send(
                    node,
                    scope["method"],
                    scope["path"],
                    scope["headers"],
                    body,
                    self.request_id,
                    query=scope.get("query_string", b""),
                    traceparent=span.traceparent(),
                )
            except UpstreamFailure as exc:
                outcome = Outcome.FAIL
                metrics.attempts.inc((("node", node.id), ("result", "error")))
                if settle is not None:
                    await settle(None, exc.sent)
                if exc.timeout:
                    timeout = UpstreamTimeout(f"node {node.id} timed out")
                    return _failed(span, timeout, final, "timeout")
                error = UpstreamError(f"node {node.id} failed: {exc}")
                return _failed(
                    span, error, final, "connection_error" if exc.sent else "connect_error"
                )
            status = response.status
            span.set("http.response.status_code", status)
            # An engine may answer a stream's 200 before it starts the work: a stream is settled
            # by its first event instead.
            deferred = settle if status == 200 and response.is_event_stream else None
            if settle is not None and deferred is None:
                await settle(status, True)
            metrics.ttfb.observe((("model", self.model),), time.perf_counter() - started_at)
            if status in RETRY_STATUSES and not final:
                outcome = Outcome.NEUTRAL if status == 429 else Outcome.FAIL
                metrics.attempts.inc((("node", node.id), ("result", str(status))))
                error = UpstreamError(f"node {node.id} answered {status}")
                return _failed(span, error, final, str(status))
            if status >= 400:
                span.fail(str(status))
            self.node_id = node.id
            if response.is_event_stream:
                outcome, tokens, last_usage = await self._relay_stream(response, route, deferred)
                counted = _stream_usage(last_usage) if last_usage else None
                cached = counted.cached() if counted is not None else None
                _trace_usage(self.span, counted)
            else:
                try:
                    data = await response.read()
                except UpstreamFailure as exc:
                    outcome = Outcome.FAIL
                    metrics.attempts.inc((("node", node.id), ("result", "error")))
                    error = UpstreamTimeout(str(exc)) if exc.timeout else UpstreamError(str(exc))
                    return _failed(span, error, final, "timeout" if exc.timeout else "body_error")
                outcome = outcome_of(status)
                if status == 200 and self.records_response:
                    await self._record_response(_answer_id(data))
                elif status == 200 and self.forgets_response:
                    await self._forget_response()
                generated = status == 200 and scope["path"] != "/v1/embeddings"
                usage = _usage(data) if generated else None
                if usage is not None:
                    tokens, cached = usage.completion_tokens, usage.cached()
                _trace_usage(self.span, usage)
                await self.send_buffered(response, data, route)
            metrics.attempts.inc((("node", node.id), ("result", str(status))))
            return None
        finally:
            span.end()
            if response is not None:
                response.close()
            elapsed = time.perf_counter() - started_at
            release = forwarder.router.release(route, outcome, elapsed, tokens, cached)
            if self.complete:
                await release  # nothing can cancel a finished exchange: no shield task needed
            else:
                await asyncio.shield(release)


def _failed(span: Span, error: GatewayError, final: bool, kind: str) -> GatewayError:
    """``error`` of an attempt, told to its span: its ``kind`` (``error.type``), and whether
    another node follows (unless the retry budget or the nodes run out: the server span
    says so)."""
    if span.recording:
        span.update({"fleetgate.retry": not final, "fleetgate.retry.reason": str(error)})
        span.fail(kind, str(error))
    return error


def _trace_route(span: Span, route: Route | None) -> None:
    """A pick span's attributes: how the node was chosen (the route receipt's fields)."""
    if not span.recording:
        return
    if route is None:
        span.set("fleetgate.candidates", 0)
        return
    span.update(
        {
            "fleetgate.node": route.node.id,
            "fleetgate.strategy": route.strategy,
            "fleetgate.candidates": route.eligible,
            "fleetgate.score": route.score,
            "fleetgate.in_flight": route.in_flight,
            "fleetgate.epoch": route.epoch,
            "fleetgate.state": "local" if route.local else "shared",
            "fleetgate.queued_ms": route.queued_ms,
        }
    )
    if route.chain is not None:
        span.update(
            {
                "fleetgate.prefix.blocks": len(route.chain.blocks),
                "fleetgate.prefix.matched_blocks": None if route.local else route.prefix_matched,
            }
        )


def _trace_usage(span: Span, usage: _Usage | None) -> None:
    """The tokens a node reported, as GenAI's semantic conventions name them."""
    if usage is not None and span.recording:
        span.update(
            {
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.completion_tokens,
            }
        )


class _Identified(msgspec.Struct):
    id: str | None = None


class _Created(msgspec.Struct):
    type: str = ""
    response: _Identified | None = None


_decode_identified = msgspec.json.Decoder(_Identified).decode
_decode_created = msgspec.json.Decoder(_Created).decode


def _answer_id(data: bytes) -> str | None:
    """A buffered Responses API answer's id."""
    try:
        return _decode_identified(data).id
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def _created_id(chunk: bytes) -> str | None:
    """The response id a stream's ``response.created`` event in ``chunk`` carries."""
    if b"response.created" not in chunk:
        return None
    for line in chunk.split(b"\n"):
        if line.startswith(b"data:") and b"response.created" in line:
            try:
                event = _decode_created(line[5:].strip())
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue
            if event.type == "response.created" and event.response is not None:
                return event.response.id
    return None


def _is_error_event(chunk: bytes) -> bool:
    """Whether a stream's first event is an error object rather than a completion chunk."""
    first = chunk.split(b"\n\n", 1)[0]
    return b'"error"' in first and b'"choices"' not in first


def _is_json(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return b"json" in value.lower()
    return False


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int = 0
    prompt_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None

    def cached(self) -> tuple[int, int] | None:
        """(prompt tokens, cached tokens) when the node reported both."""
        details = self.prompt_tokens_details
        if details is None or details.cached_tokens is None or self.prompt_tokens <= 0:
            return None
        return self.prompt_tokens, details.cached_tokens


class _Answer(msgspec.Struct):
    usage: _Usage | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


def _usage(data: bytes) -> _Usage | None:
    """The usage a buffered answer (or one stream event) reports; None when it says nothing."""
    try:
        return _decode_answer(data).usage
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def _token_texts(chunk: bytes) -> int:
    """The texts a stream's ``chunk`` carries, about one per generated token."""
    return len(_TOKEN_TEXT.findall(chunk))


def _stream_usage(chunk: bytes) -> _Usage | None:
    """The usage of the last event of ``chunk`` that reports one (None when none does)."""
    for line in reversed(chunk.split(b"\n")):
        if line.startswith(b"data:") and b'"usage"' in line:
            usage = _usage(line[5:].strip())
            if usage is not None and (usage.completion_tokens or usage.prompt_tokens):
                return usage
    return None
