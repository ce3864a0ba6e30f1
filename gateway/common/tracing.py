"""Optional OpenTelemetry tracing for every fleetgate process, behind one small interface.

Call sites ask :func:`tracer` for their span in one line. While tracing is off (the default),
it returns a tracer whose spans record nothing: no OpenTelemetry module is imported, and a
request pays a few empty method calls. Tracing is on when the ``otel`` extra is installed
(``pip install "fleetgate[otel]"``) and ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER`` is set; the SDK reads its
other ``OTEL_*`` variables itself (``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``, the batch
processor's, the exporter's headers and timeouts).

Spans are parented through OpenTelemetry's context: a span used as a ``with`` block, and a
request's server span until it ends, is the parent of the spans started meanwhile in its task
(and in the tasks it creates). Only W3C Trace Context is read from clients and written to nodes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from gateway.common.config import otel_environment

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import Tracer as OtelTracer

log = logging.getLogger("fleetgate.tracing")

Attribute = str | bool | int | float
Headers = Iterable[tuple[bytes, bytes]]
# What asks for tracing: an exporter named, or an endpoint to export to.
SWITCHES: Final = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
)
# The client's trace context, read into the request's server span.
_CONTEXT_HEADERS: Final = frozenset({b"traceparent", b"tracestate"})


class Span:
    """A span that records nothing: every span while tracing is off."""

    __slots__ = ()

    @property
    def recording(self) -> bool:
        """Whether attributes set now are kept (worth computing)."""
        return False

    def set(self, key: str, value: Attribute | None) -> None:
        """Set one attribute (``None``: left unset)."""

    def update(self, attributes: Mapping[str, Attribute | None]) -> None:
        """Set several attributes (``None`` values left unset)."""

    def fail(self, error_type: str, description: str = "") -> None:
        """Mark the span failed: status ERROR and ``error.type``."""

    def traceparent(self) -> bytes | None:
        """The W3C ``traceparent`` naming this span as the parent of a node's work."""
        return None

    def end(self) -> None:
        """End the span (and stop it being the current one, if it was)."""

    def __enter__(self) -> Span:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


NO_SPAN: Final = Span()


class Tracer:
    """Starts fleetgate's spans; this one, tracing off, starts none."""

    __slots__ = ()
    enabled: bool = False

    def server(self, method: str, path: str, route: str, headers: Headers) -> Span:
        """A request's server span, continuing the client's ``traceparent``; the current span
        until :meth:`Span.end`, which must be called in the same task."""
        return NO_SPAN

    def span(self, name: str, attributes: Mapping[str, Attribute] | None = None) -> Span:
        """An internal span, child of the current one; the current span inside its ``with``."""
        return NO_SPAN

    def upstream(self, method: str, node_id: str, url: str, path: str, attempt: int) -> Span:
        """The client span of one attempt on a node (its ``traceparent`` goes to the node);
        never the current span."""
        return NO_SPAN


class _Span(Span):
    """An OpenTelemetry span, made current by ``with`` (or by :meth:`_Tracer.server`)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: OtelSpan, token: Token[Context] | None = None) -> None:
        self._span = span
        self._token = token

    @property
    def recording(self) -> bool:
        return self._span.is_recording()

    def set(self, key: str, value: Attribute | None) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def update(self, attributes: Mapping[str, Attribute | None]) -> None:
        self._span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def fail(self, error_type: str, description: str = "") -> None:
        self._span.set_attribute("error.type", error_type)
        self._span.set_status(_api().error(description or error_type))

    def traceparent(self) -> bytes | None:
        context = self._span.get_span_context()
        if not context.is_valid:
            return None
        flags = int(context.trace_flags)
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}".encode()

    def end(self) -> None:
        if self._token is not None:
            _api().context.detach(self._token)
            self._token = None
        self._span.end()

    def __enter__(self) -> Span:
        api = _api()
        self._token = api.context.attach(api.trace.set_span_in_context(self._span))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is not None and exc is not None:
            name = "cancelled" if kind.__name__ == "CancelledError" else kind.__name__
            if name != "cancelled":
                self._span.record_exception(exc)
            self.fail(name, str(exc)[:500] or name)
        self.end()


class _Tracer(Tracer):
    """The SDK's tracer, for fleetgate's spans."""

    __slots__ = ("_tracer",)
    enabled = True

    def __init__(self, tracer: OtelTracer) -> None:
        self._tracer = tracer

    def server(self, method: str, path: str, route: str, headers: Headers) -> Span:
        api = _api()
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in _CONTEXT_HEADERS
        }
        parent = api.propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            f"{method} {route}" if route else method, context=parent, kind=api.trace.SpanKind.SERVER
        )
        if span.is_recording():  # attributes only for a sampled trace
            span.set_attributes({"http.request.method": method, "url.path": path})
            if route:
                span.set_attribute("http.route", route)
        token = api.context.attach(api.trace.set_span_in_context(span, parent))
        return _Span(span, token)

    def span(self, name: str, attributes: Mapping[str, Attribute] | None = None) -> Span:
        return _Span(self._tracer.start_span(name, attributes=attributes))

    def upstream(self, method: str, node_id: str, url: str, path: str, attempt: int) -> Span:
        span = self._tracer.start_span(f"{method} {path}", kind=_api().trace.SpanKind.CLIENT)
        if not span.is_recording():
            return _Span(span)
        host, port = _address(url)
        attributes: dict[str, Attribute] = {
            "http.request.method": method,
            "url.full": url.rstrip("/") + path,
            "server.address": host,
            "fleetgate.node": node_id,
            "fleetgate.attempt": attempt,
        }
        if port is not None:
            attributes["server.port"] = port
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        span.set_attributes(attributes)
        return _Span(span)


@functools.lru_cache(maxsize=4096)
def _address(url: str) -> tuple[str, int | None]:
    """A node URL's host and port (a fleet has few nodes: parsed once each)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port


class _Api:
    """The OpenTelemetry API parts spans use, imported once tracing is turned on."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.context = context
        self.trace = trace
        self.propagator = TraceContextTextMapPropagator()

    def error(self, description: str) -> Any:
        return self.trace.Status(self.trace.StatusCode.ERROR, description)


_loaded: _Api | None = None


def _api() -> _Api:
    global _loaded
    if _loaded is None:
        _loaded = _Api()
    return _loaded


_NO_TRACER: Final = Tracer()
_tracer: Tracer = _NO_TRACER
_provider: TracerProvider | None = None


def tracer() -> Tracer:
    """This process's tracer: one that records nothing unless :func:`setup` turned it on."""
    return _tracer


def requested(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` asks for tracing (an exporter or an OTLP endpoint is named)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return any(environ.get(name, "").strip() for name in SWITCHES)


def setup(
    service: str,
    instance: str = "",
    environ: Mapping[str, str] | None = None,
    *,
    exporter: SpanExporter | None = None,
) -> bool:
    """Turn tracing on if the environment asks for it (or an ``exporter`` is given, exported
    to span by span, for tests) and the SDK is installed; whether it is on. ``service``
    names the process unless ``OTEL_SERVICE_NAME`` does; ``instance`` is its id."""
    global _tracer, _provider
    environ = otel_environment() if environ is None else environ
    if exporter is None and not requested(environ):
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_* variables ask for tracing, but OpenTelemetry's SDK is not installed: "
            'pip install "fleetgate[otel]"; tracing stays off'
        )
        return False
    named = "OTEL_SERVICE_NAME" in environ or "service.name=" in environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    attributes: dict[str, Any] = {} if named else {"service.name": service}
    if instance:
        attributes["service.instance.id"] = instance
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        exporters = _exporters(environ)
        if not exporters:
            return False
        for chosen in exporters:
            provider.add_span_processor(BatchSpanProcessor(chosen))
    shutdown()
    _provider = provider
    _tracer = _Tracer(provider.get_tracer("fleetgate"))
    log.info("tracing on: %s", ", ".join(sorted(_exporter_names(environ, exporter))))
    return True


def _exporter_names(environ: Mapping[str, str], exporter: SpanExporter | None) -> list[str]:
    if exporter is not None:
        return [type(exporter).__name__]
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    return [n for n in names if n]


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (default ``otlp``): OTLP over HTTP with
    protobuf (the extra's), or ``console``."""
    chosen: list[SpanExporter] = []
    for name in _exporter_names(environ, None):
        if name == "otlp":
            protocol = environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
            )
            if protocol and protocol != "http/protobuf":
                log.warning("OTLP protocol %r is not shipped: exporting http/protobuf", protocol)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            chosen.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            chosen.append(ConsoleSpanExporter())
        elif name != "none":
            log.warning("OTEL_TRACES_EXPORTER names %r, which fleetgate does not ship", name)
    return chosen


def shutdown(timeout_s: float = 5.0) -> None:
    """Export what is left (waiting at most about ``timeout_s``) and turn tracing off."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, _NO_TRACER
    if provider is not None:
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()
