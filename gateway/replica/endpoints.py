"""Every model-addressed endpoint the gateway proxies, how it finds the model, and in which
API's shape its errors are written.

Three kinds: a JSON body naming ``model`` (chat, completions, embeddings, the Responses API,
Anthropic's Messages API, rerank, score, tokenize); a multipart form with a ``model`` field
(audio); and a Responses API call by id (``/v1/responses/{id}...``), which names no model and
goes to the node that holds the response.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import orjson

from .errors import BadRequest, GatewayError, MissingModel, error_body


class Dialect(enum.Enum):
    """The API whose error shape a path's clients expect."""

    OPENAI = "openai"
    RESPONSES = "responses"  # OpenAI's shape, and a stream cut midway ends with its error event
    ANTHROPIC = "anthropic"


class Body(enum.Enum):
    JSON = "json"
    MULTIPART = "multipart"
    NONE = "none"  # a by-id call: no model in the request


@dataclass(frozen=True, slots=True)
class Endpoint:
    body: Body
    methods: frozenset[str]
    dialect: Dialect = Dialect.OPENAI
    records_response: bool = False  # POST /v1/responses: the answer's id is recorded
    forgets_response: bool = False  # DELETE /v1/responses/{id}


_POST = frozenset({"POST"})
JSON_PATHS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(Body.JSON, _POST),
    "/v1/completions": Endpoint(Body.JSON, _POST),
    "/v1/embeddings": Endpoint(Body.JSON, _POST),
    "/v1/responses": Endpoint(Body.JSON, _POST, Dialect.RESPONSES, records_response=True),
    "/v1/messages": Endpoint(Body.JSON, _POST, Dialect.ANTHROPIC),
    "/v1/messages/count_tokens": Endpoint(Body.JSON, _POST, Dialect.ANTHROPIC),
    "/v1/rerank": Endpoint(Body.JSON, _POST),
    "/rerank": Endpoint(Body.JSON, _POST),
    "/v2/rerank": Endpoint(Body.JSON, _POST),
    "/v1/score": Endpoint(Body.JSON, _POST),
    "/score": Endpoint(Body.JSON, _POST),
    "/tokenize": Endpoint(Body.JSON, _POST),
    "/detokenize": Endpoint(Body.JSON, _POST),
    "/v1/audio/transcriptions": Endpoint(Body.MULTIPART, _POST),
    "/v1/audio/translations": Endpoint(Body.MULTIPART, _POST),
}
# /v1/responses/{id}, /v1/responses/{id}/cancel, /v1/responses/{id}/input_items
_BY_ID = re.compile(r"^/v1/responses/([A-Za-z0-9_.:\-]{1,200})(/cancel|/input_items)?$")
_BY_ID_METHODS = {
    "": Endpoint(Body.NONE, frozenset({"GET", "DELETE"}), Dialect.RESPONSES),
    "/cancel": Endpoint(Body.NONE, _POST, Dialect.RESPONSES),
    "/input_items": Endpoint(Body.NONE, frozenset({"GET"}), Dialect.RESPONSES),
}
_DELETE_BY_ID = Endpoint(Body.NONE, frozenset({"GET", "DELETE"}), Dialect.RESPONSES, False, True)


def endpoint_of(path: str, method: str = "") -> tuple[Endpoint, str] | None:
    """The endpoint of ``path`` and, for a by-id call, the response id; None when the path is
    not proxied."""
    found = JSON_PATHS.get(path)
    if found is not None:
        return found, ""
    if not path.startswith("/v1/responses/"):
        return None
    match = _BY_ID.match(path)
    if match is None:
        return None
    endpoint = _BY_ID_METHODS[match.group(2) or ""]
    if endpoint.body is Body.NONE and not match.group(2) and method == "DELETE":
        endpoint = _DELETE_BY_ID
    return endpoint, match.group(1)


def is_proxied(path: str) -> bool:
    return path in JSON_PATHS or (path.startswith("/v1/responses/") and bool(_BY_ID.match(path)))


# -- multipart ---------------------------------------------------------------------------

_BOUNDARY = re.compile(rb'boundary="?([^";,]{1,200})"?', re.IGNORECASE)
_NAME = re.compile(rb'name="([^"]*)"', re.IGNORECASE)
_MAX_FIELD_BYTES = 1024


def multipart_boundary(content_type: bytes) -> bytes:
    """The boundary of a ``multipart/form-data`` body, or :class:`BadRequest`."""
    media = content_type.split(b";", 1)[0].strip().lower()
    match = _BOUNDARY.search(content_type)
    if media != b"multipart/form-data" or match is None:
        raise BadRequest("send multipart/form-data with a boundary", param="file")
    return match.group(1)


def multipart_field(body: bytes, boundary: bytes, name: bytes) -> str | None:
    """The value of the small text field ``name`` of a multipart body, found by scanning the
    parts' headers in place: the file part is never copied. None when absent."""
    delimiter = b"--" + boundary
    view = memoryview(body)
    at = body.find(delimiter)
    while at != -1:
        start = at + len(delimiter)
        if body[start : start + 2] == b"--":  # the closing delimiter
            return None
        head_end = body.find(b"\r\n\r\n", start)
        if head_end == -1:
            return None
        nxt = body.find(b"\r\n" + delimiter, head_end)
        if nxt == -1:
            return None
        headers = bytes(view[start:head_end])
        match = _NAME.search(headers)
        if match is not None and match.group(1) == name:
            value = bytes(view[head_end + 4 : min(nxt, head_end + 4 + _MAX_FIELD_BYTES)])
            return value.decode("utf-8", "replace").strip()
        at = nxt + 2
    return None


def model_of_form(body: bytes, content_type: bytes) -> str:
    model = multipart_field(body, multipart_boundary(content_type), b"model")
    if not model:
        raise MissingModel("you must provide a model parameter")
    return model


# -- errors in each API's shape ------------------------------------------------------------

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> bytes:
    """Anthropic's error object: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def reshape_error(dialect: Dialect, status: int, openai_body: bytes) -> bytes:
    """An error the gateway wrote in OpenAI's shape, in ``dialect``'s shape instead."""
    if dialect is not Dialect.ANTHROPIC:
        return openai_body
    try:
        message = str(orjson.loads(openai_body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = openai_body.decode("utf-8", "replace")
    return anthropic_error_body(status, message)


def stream_error_event(dialect: Dialect, message: str, code: str, sequence: int = 0) -> bytes:
    """The SSE event that ends a stream cut midway, in the stream's own protocol."""
    if dialect is Dialect.ANTHROPIC:
        data = anthropic_error_body(502, message)
        return b"event: error\ndata: " + data + b"\n\n"
    if dialect is Dialect.RESPONSES:
        data = orjson.dumps(
            {
                "type": "error",
                "code": code,
                "message": message,
                "param": None,
                "sequence_number": sequence,
            }
        )
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + error_body(message, "upstream_error", code) + b"\n\n"


class ResponseNotFound(GatewayError):
    """No node is known to hold this response (never recorded, expired or deleted)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "response_not_found"


class ResponseEngineUnavailable(GatewayError):
    """The node that holds the response cannot serve now; no other node can continue it."""

    status_code = 503
    error_type = "service_unavailable"
    code = "response_engine_unavailable"
    headers = ((b"retry-after", b"5"),)
