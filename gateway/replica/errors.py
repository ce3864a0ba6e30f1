"""The gateway's errors, each with its HTTP status and OpenAI error type, and their rendering.

Every error a client sees is ``{"error": {"message", "type", "param", "code"}}`` with the
matching status; shared-state errors render the same way.
"""

from __future__ import annotations

import math

import orjson

from shared_state import StateError
from shared_state import limits as key_limits


class GatewayError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = "internal_error"
    param: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param


class BadRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class AmbiguousFraming(BadRequest):
    """Content-Length with Transfer-Encoding (RFC 9112 6.3): the body's end is in doubt, so is
    whatever follows it on the connection; answered, then the connection is closed."""

    code = "ambiguous_framing"
    headers = ((b"connection", b"close"),)


class MissingModel(BadRequest):
    code = "missing_model"
    param = "model"


class Unauthorized(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"
    headers = ((b"www-authenticate", b"Bearer"),)


class Forbidden(GatewayError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"
    param = "model"


class MethodNotAllowed(GatewayError):
    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    """The client did not send its whole body in time; the connection cannot be reused."""

    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"
    headers = ((b"connection", b"close"),)


class BodyTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status_code = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(GatewayError):
    """A stored client key went over its requests-per-minute or concurrency limit."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, decision: key_limits.LimitDecision) -> None:
        seconds = max(1, math.ceil(decision.retry_after_s))
        if decision.limit == key_limits.CONCURRENCY:
            self.code = "concurrency_limit_exceeded"
            what = f"{decision.concurrency} concurrent requests"
        else:
            what = f"{decision.rpm} requests per minute"
        super().__init__(
            f"Rate limit reached for this API key: {what}. Please try again in {seconds}s."
        )
        self.headers = ((b"retry-after", str(seconds).encode()),)


class QueueFull(GatewayError):
    """Every node of the model is at capacity and its queue holds ``--max-queue`` requests."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = ((b"retry-after", str(max(1, retry_after_s)).encode()),)


class QueueTimeout(GatewayError):
    """The request waited ``--queue-timeout`` for a node with room and got none."""

    status_code = 503
    error_type = "service_unavailable"
    code = "queue_timeout"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = ((b"retry-after", str(max(1, retry_after_s)).encode()),)


class NoHealthyNode(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "no_healthy_node"
    headers = ((b"retry-after", b"1"),)


class StoreDown(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "store_unavailable"
    headers = ((b"retry-after", b"1"),)


class UpstreamError(GatewayError):
    status_code = 502
    error_type = "upstream_error"
    code = "bad_gateway"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"


def error_body(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )


def render(exc: Exception) -> tuple[int, bytes, tuple[tuple[bytes, bytes], ...]]:
    """Status, JSON body and extra headers for any error a handler raised."""
    if isinstance(exc, GatewayError):
        body = error_body(exc.message, exc.error_type, exc.code, exc.param)
        return exc.status_code, body, exc.headers
    if isinstance(exc, StateError):
        status = exc.status_code
        extra = ((b"retry-after", b"1"),) if status == 503 else ()
        return status, error_body(str(exc), exc.error_type, exc.code), extra
    return 500, error_body("internal error", "server_error", "internal_error"), ()


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """An OpenAI-shaped error as one SSE event, to end a stream that broke midway."""
    return b"data: " + error_body(message, "upstream_error", code) + b"\n\n"
