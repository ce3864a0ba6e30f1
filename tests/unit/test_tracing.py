"""OpenTelemetry tracing in-process, spans kept by the SDK's InMemorySpanExporter: a proxied
request's server span continuing the client's trace, its pick (and queue) and upstream attempt
spans, the ``traceparent`` written into the node's request head by the real upstream client
(its connections faked), retries, usage tokens, the health-checker's rounds, and tracing off.
The OTLP export of a real gateway process is tested in tests/e2e/test_tracing.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import Message

from gateway.checker.health_checker import CheckerSettings, HealthChecker
from gateway.checker.probes import Finding, Prober
from gateway.common import tracing
from gateway.replica.admission import Admission
from gateway.replica.auth import Authenticator
from gateway.replica.exchange import Forwarder
from gateway.replica.metrics import GatewayMetrics
from gateway.replica.proxy import ProxyHandler
from gateway.replica.routing import Router
from gateway.replica.upstream import Origin, Timeouts, Upstream, _Connection
from shared_state import Node, Store, Strategy
from tests.support.store import StoreFactory

MODEL = "m"
A, B = "http://127.0.0.1:9701", "http://127.0.0.1:9702"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_PARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01".encode()
ANSWER = orjson.dumps(
    {
        "id": "c1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
)
STREAM = (
    b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    b"data: [DONE]\n\n"
)


def http_answer(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n".encode()
    return head + b"content-type: " + content_type + b"\r\n\r\n" + body


@dataclass
class Wire:
    """The bytes of each request the gateway wrote to a node, and the answers it gets back in
    order (``hold``: the first answer waits for it)."""

    answers: list[bytes]
    requests: list[bytes] = field(default_factory=list)
    hold: asyncio.Event | None = None
    written: asyncio.Event = field(default_factory=asyncio.Event)

    def head(self, index: int) -> dict[bytes, bytes]:
        lines = self.requests[index].split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
        return {name.lower(): value for name, _, value in (ln.partition(b": ") for ln in lines)}


class _Transport:
    """A node's end of one connection: keeps what is written, feeds the next answer back."""

    def __init__(self, wire: Wire, conn: _Connection) -> None:
        self.wire, self.conn, self.closing = wire, conn, False

    def write(self, data: bytes) -> None:
        self.wire.requests.append(data)
        self.wire.written.set()
        answer = self.wire.answers.pop(0)
        hold = self.wire.hold if len(self.wire.requests) == 1 else None
        asyncio.get_running_loop().create_task(self._answer(answer, hold))

    async def _answer(self, answer: bytes, hold: asyncio.Event | None) -> None:
        if hold is not None:
            await hold.wait()
        self.conn.data_received(answer)

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    close = abort

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class WireUpstream(Upstream):
    """The real upstream client (its request heads, its parser), every connection faked."""

    def __init__(self, wire: Wire) -> None:
        super().__init__(Timeouts(1.0, 5.0, 5.0))
        self.wire = wire

    async def _connect(self, origin: Origin) -> _Connection:
        conn = _Connection(asyncio.get_running_loop())
        conn.connection_made(cast(Any, _Transport(self.wire, conn)))
        return conn


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("fleetgate-test", "r1", {}, exporter=exporter)
    yield exporter
    tracing.shutdown()


async def fleet(factory: StoreFactory, caps: Mapping[str, int | None]) -> Store:
    """Nodes serving MODEL, each with its capacity (None: no bound)."""
    store = factory()
    for url, cap in caps.items():
        await store.add_node(url, [MODEL], max_inflight=cap)
    await store.refresh_latest()
    return store


@pytest.fixture
async def routers() -> AsyncIterator[list[Router]]:
    made: list[Router] = []
    yield made
    for router in made:
        await router.stop()


def handler(store: Store, wire: Wire, routers: list[Router]) -> ProxyHandler:
    metrics = GatewayMetrics()
    admission = Admission(store, "r1", metrics, timeout_s=5.0, poll_s=0.05)
    router = Router(store, "r1", Strategy.LEAST_CONNECTIONS, metrics, admission=admission)
    routers.append(router)
    forwarder = Forwarder(router, WireUpstream(wire), metrics, max_attempts=3)
    auth = Authenticator((), None, (), store)
    return ProxyHandler(forwarder, auth, max_body_bytes=1 << 20)


async def call(
    proxy: ProxyHandler, body: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[int, bytes]:
    """One request through the raw-ASGI handler: its status and body."""
    raw = orjson.dumps(body)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            *headers,
        ],
        "client": ("127.0.0.1", 40000),
    }
    sent: list[Message] = []
    read = False

    async def receive() -> Message:
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the client stays until the answer is over
        raise AssertionError

    async def send(message: Message) -> None:
        sent.append(message)

    await proxy(scope, receive, send)
    status = int(sent[0]["status"])
    return status, b"".join(m.get("body", b"") for m in sent[1:])


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = named(exporter, name)
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def of_kind(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    """The spans of ``kind``, in the order they started."""
    found = [s for s in exporter.get_finished_spans() if s.kind is kind]
    return sorted(found, key=lambda s: s.start_time or 0)


def parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None
    return span.parent.span_id


def server_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (server,) = of_kind(exporter, SpanKind.SERVER)
    assert server.name == "POST /v1/chat/completions"
    return server


def traceparent_of(span: ReadableSpan) -> bytes:
    context = span.context
    flags = int(context.trace_flags)
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}".encode()


async def test_a_request_continues_the_clients_trace_into_the_node(
    spans: InMemorySpanExporter, store_factory: StoreFactory, routers: list[Router]
) -> None:
    wire = Wire([http_answer(200, ANSWER)])
    proxy = handler(await fleet(store_factory, {A: None}), wire, routers)
    status, _ = await call(
        proxy, {"model": MODEL, "messages": []}, ((b"traceparent", CLIENT_PARENT),)
    )
    assert status == 200

    server = server_span(spans)
    assert server.kind is SpanKind.SERVER
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert f"{parent_of(server):016x}" == CLIENT_SPAN
    assert dict(server.attributes or {}) | {"fleetgate.request_id": ""} == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": MODEL,
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 7,
        "fleetgate.request_id": "",
        "fleetgate.node": A,
        "fleetgate.attempts": 1,
    }
    assert server.resource.attributes["service.name"] == "fleetgate-test"

    pick = one(spans, "fleetgate.pick")
    assert parent_of(pick) == server.context.span_id
    attributes = pick.attributes or {}
    assert attributes["fleetgate.node"] == A
    assert attributes["fleetgate.strategy"] == "least_connections"
    assert attributes["fleetgate.candidates"] == 1
    assert attributes["fleetgate.state"] == "shared"
    assert "fleetgate.score" in attributes and "fleetgate.queued_ms" not in attributes

    (node_call,) = of_kind(spans, SpanKind.CLIENT)
    assert parent_of(node_call) == server.context.span_id
    assert node_call.status.status_code is StatusCode.UNSET
    assert dict(node_call.attributes or {}) == {
        "http.request.method": "POST",
        "url.full": A + "/v1/chat/completions",
        "server.address": "127.0.0.1",
        "server.port": 9701,
        "fleetgate.node": A,
        "fleetgate.attempt": 1,
        "http.response.status_code": 200,
    }
    # The node sees the gateway's attempt as its parent, in the client's trace; once.
    assert wire.head(0)[b"traceparent"] == traceparent_of(node_call)
    assert wire.requests[0].count(b"traceparent") == 1


async def test_a_retried_attempt_says_why_and_the_next_one_resends(
    spans: InMemorySpanExporter, store_factory: StoreFactory, routers: list[Router]
) -> None:
    wire = Wire([http_answer(503, b'{"error": "busy"}'), http_answer(200, ANSWER)])
    proxy = handler(await fleet(store_factory, {A: None, B: None}), wire, routers)
    status, _ = await call(proxy, {"model": MODEL, "messages": []})
    assert status == 200

    server = server_span(spans)
    assert server.parent is None  # no traceparent from the client: a trace of its own
    assert (server.attributes or {})["fleetgate.attempts"] == 2
    first, second = of_kind(spans, SpanKind.CLIENT)
    assert first.status.status_code is StatusCode.ERROR
    failed = first.attributes or {}
    assert failed["error.type"] == "503" and failed["fleetgate.retry"] is True
    assert "answered 503" in str(failed["fleetgate.retry.reason"])
    assert (second.attributes or {})["http.request.resend_count"] == 1
    assert (second.attributes or {})["fleetgate.node"] != failed["fleetgate.node"]
    assert len(named(spans, "fleetgate.pick")) == 2
    assert wire.head(0)[b"traceparent"] == traceparent_of(first)
    assert wire.head(1)[b"traceparent"] == traceparent_of(second)


async def test_when_no_node_is_left_the_server_span_says_so(
    spans: InMemorySpanExporter, store_factory: StoreFactory, routers: list[Router]
) -> None:
    wire = Wire([http_answer(503, b'{"error": "busy"}')])
    proxy = handler(await fleet(store_factory, {A: None}), wire, routers)
    status, _ = await call(proxy, {"model": MODEL, "messages": []})
    assert status == 502
    server = server_span(spans)
    assert server.status.status_code is StatusCode.ERROR
    assert (server.attributes or {})["fleetgate.retry.stopped"] == "no other node"
    assert (server.attributes or {})["error.type"] == "502"


async def test_a_streams_usage_is_on_the_server_span(
    spans: InMemorySpanExporter, store_factory: StoreFactory, routers: list[Router]
) -> None:
    wire = Wire([http_answer(200, STREAM, b"text/event-stream")])
    proxy = handler(await fleet(store_factory, {A: None}), wire, routers)
    status, body = await call(proxy, {"model": MODEL, "messages": [], "stream": True})
    assert status == 200 and body.endswith(b"[DONE]\n\n")
    attributes = server_span(spans).attributes or {}
    assert attributes["gen_ai.usage.input_tokens"] == 3
    assert attributes["gen_ai.usage.output_tokens"] == 1


async def test_a_request_that_waited_has_a_queue_span_in_its_pick(
    spans: InMemorySpanExporter, store_factory: StoreFactory, routers: list[Router]
) -> None:
    hold = asyncio.Event()
    wire = Wire([http_answer(200, ANSWER), http_answer(200, ANSWER)], hold=hold)
    proxy = handler(await fleet(store_factory, {A: 1}), wire, routers)
    first = asyncio.create_task(call(proxy, {"model": MODEL, "messages": []}))
    await wire.written.wait()
    second = asyncio.create_task(call(proxy, {"model": MODEL, "messages": []}))
    await asyncio.sleep(0.1)
    assert not second.done()  # waiting in the queue for the one slot
    hold.set()
    assert (await first)[0] == 200 and (await second)[0] == 200

    queue = one(spans, "fleetgate.queue")
    picks = {s.context.span_id: s for s in named(spans, "fleetgate.pick")}
    pick = picks[parent_of(queue)]
    assert (queue.attributes or {}) == {
        "gen_ai.request.model": MODEL,
        "fleetgate.priority": "normal",
        "fleetgate.node": A,
    }
    queued_ms = (pick.attributes or {})["fleetgate.queued_ms"]
    assert isinstance(queued_ms, float) and queued_ms > 50
    servers = {s.context.span_id: s for s in of_kind(spans, SpanKind.SERVER)}
    assert (servers[parent_of(pick)].attributes or {})["fleetgate.priority"] == "normal"


async def test_off_the_clients_traceparent_goes_to_the_node_unchanged(
    store_factory: StoreFactory, routers: list[Router]
) -> None:
    assert not tracing.setup("fleetgate-test", environ={})
    assert tracing.tracer().enabled is False
    wire = Wire([http_answer(200, ANSWER)])
    proxy = handler(await fleet(store_factory, {A: None}), wire, routers)
    headers = ((b"traceparent", CLIENT_PARENT), (b"tracestate", b"vendor=1"))
    assert (await call(proxy, {"model": MODEL, "messages": []}, headers))[0] == 200
    assert wire.head(0)[b"traceparent"] == CLIENT_PARENT
    assert wire.head(0)[b"tracestate"] == b"vendor=1"


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "gw"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, False),
    ],
)
def test_what_turns_tracing_on(environ: dict[str, str], on: bool) -> None:
    assert tracing.requested(environ) is on


def test_the_service_name_is_the_environments_when_it_names_one() -> None:
    exporter = InMemorySpanExporter()
    tracing.setup("fleetgate-gateway", "r9", {"OTEL_SERVICE_NAME": "edge"}, exporter=exporter)
    try:
        with tracing.tracer().span("x"):
            pass
    finally:
        tracing.shutdown()
    (span,) = exporter.get_finished_spans()
    assert span.resource.attributes["service.instance.id"] == "r9"
    assert tracing.tracer().enabled is False


class _Prober(Prober):
    """Health probes answered here: node B fails."""

    async def health(self, node: Node) -> Finding:
        return Finding(node.url != B, "" if node.url != B else "connection refused")


async def test_a_probe_round_is_a_span_with_one_per_node(
    spans: InMemorySpanExporter, store_factory: StoreFactory
) -> None:
    store = await fleet(store_factory, {A: None, B: None})
    checker = HealthChecker(CheckerSettings(checker_id="c1", probes=frozenset({"health"})), store)
    await checker.prober.close()
    checker.prober = _Prober(1.0)
    checker.token, _ = await checker.ledger.lead(10_000)
    try:
        await checker.probe_round()
    finally:
        await checker.prober.close()

    round_span = one(spans, "fleetgate.probe_round")
    assert round_span.parent is None
    attributes = round_span.attributes or {}
    assert attributes["fleetgate.checker"] == "c1" and attributes["fleetgate.nodes"] == 2
    assert attributes["fleetgate.nodes.active"] == 2
    probes = {(s.attributes or {})["fleetgate.node"]: s for s in named(spans, "fleetgate.probe")}
    assert set(probes) == {A, B}
    assert all(parent_of(s) == round_span.context.span_id for s in probes.values())
    assert probes[A].status.status_code is StatusCode.UNSET
    assert probes[B].status.status_code is StatusCode.ERROR
    assert (probes[B].attributes or {})["fleetgate.probe.reason"] == "connection refused"
