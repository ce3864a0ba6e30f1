"""The proxied endpoints' table, the model read from a multipart form in place, response ids
read from answers, and errors written in each API's own shape."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.replica.endpoints import (
    Body,
    Dialect,
    endpoint_of,
    is_proxied,
    multipart_boundary,
    multipart_field,
    reshape_error,
    stream_error_event,
)
from gateway.replica.errors import BadRequest, error_body
from gateway.replica.exchange import _answer_id, _created_id

BOUNDARY = b"----fleetgate7MA4YWxk"


def form(fields: list[tuple[str, bytes, str | None]]) -> bytes:
    parts = []
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"'
        if filename:
            disposition += f'; filename="{filename}"'
        head = f"Content-Disposition: {disposition}\r\n"
        if filename:
            head += "Content-Type: audio/wav\r\n"
        parts.append(b"--" + BOUNDARY + b"\r\n" + head.encode() + b"\r\n" + value + b"\r\n")
    return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n"


def test_every_endpoint_has_its_body_kind_methods_and_dialect() -> None:
    assert endpoint_of("/v1/messages", "POST")[0].dialect is Dialect.ANTHROPIC  # type: ignore[index]
    found = endpoint_of("/v1/responses/resp_abc", "DELETE")
    assert found is not None and found[1] == "resp_abc" and found[0].forgets_response
    found = endpoint_of("/v1/responses/resp_abc/input_items", "GET")
    assert found is not None and found[0].body is Body.NONE and found[0].methods == {"GET"}
    assert endpoint_of("/v1/audio/transcriptions")[0].body is Body.MULTIPART  # type: ignore[index]
    assert endpoint_of("/v1/responses")[0].records_response  # type: ignore[index]
    for path in ("/v1/responses/", "/v1/responses/a/b", "/v1/responses/x/cancel/more", "/v2/x"):
        assert endpoint_of(path) is None and not is_proxied(path)


def test_the_model_field_is_found_whatever_the_order_of_parts() -> None:
    audio = b"RIFF" + bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"
    for fields in (
        [("file", audio, "a.wav"), ("model", b"whisper-1", None)],
        [("model", b"whisper-1", None), ("file", audio, "a.wav"), ("language", b"en", None)],
    ):
        body = form(fields)
        assert multipart_field(body, BOUNDARY, b"model") == "whisper-1"
        assert multipart_field(body, BOUNDARY, b"language") in ("en", None)
    assert multipart_field(form([("file", audio, "a.wav")]), BOUNDARY, b"model") is None


@given(st.binary(max_size=600))
def test_a_malformed_form_never_raises(body: bytes) -> None:
    result = multipart_field(body, BOUNDARY, b"model")
    assert result is None or isinstance(result, str)


def test_the_boundary_comes_from_the_content_type() -> None:
    assert multipart_boundary(b'multipart/form-data; boundary="abc"') == b"abc"
    assert multipart_boundary(b"multipart/form-data; boundary=abc; charset=x") == b"abc"
    for bad in (b"application/json", b"multipart/form-data", b""):
        with pytest.raises(BadRequest):
            multipart_boundary(bad)


def test_errors_take_the_shape_of_their_api() -> None:
    openai_body = error_body("no healthy node", "service_unavailable", "no_healthy_node")
    assert reshape_error(Dialect.OPENAI, 503, openai_body) == openai_body
    assert reshape_error(Dialect.RESPONSES, 503, openai_body) == openai_body
    anthropic = orjson.loads(reshape_error(Dialect.ANTHROPIC, 503, openai_body))
    assert anthropic == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "no healthy node"},
    }
    kinds = {
        s: orjson.loads(reshape_error(Dialect.ANTHROPIC, s, openai_body))["error"]["type"]
        for s in (400, 401, 404, 413, 429, 500, 502)
    }
    assert kinds == {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        502: "api_error",
    }


def test_a_cut_stream_ends_with_its_protocols_error_event() -> None:
    anthropic = stream_error_event(Dialect.ANTHROPIC, "cut", "upstream_stream_error")
    assert anthropic.startswith(b"event: error\ndata: ")
    assert orjson.loads(anthropic.split(b"data: ", 1)[1])["type"] == "error"
    responses = stream_error_event(Dialect.RESPONSES, "cut", "upstream_stream_error", 7)
    data = orjson.loads(responses.split(b"data: ", 1)[1])
    assert data["type"] == "error" and data["sequence_number"] == 7
    assert data["code"] == "upstream_stream_error"
    openai = stream_error_event(Dialect.OPENAI, "cut", "upstream_stream_error")
    assert orjson.loads(openai[6:])["error"]["code"] == "upstream_stream_error"


def test_response_ids_are_read_from_answers_and_created_events() -> None:
    assert _answer_id(b'{"id": "resp_1", "object": "response"}') == "resp_1"
    assert _answer_id(b"not json") is None
    created = (
        b"event: response.created\n"
        b'data: {"type":"response.created","sequence_number":0,'
        b'"response":{"id":"resp_2","object":"response","status":"in_progress"}}\n\n'
    )
    assert _created_id(created) == "resp_2"
    assert _created_id(b'event: response.in_progress\ndata: {"type":"x"}\n\n') is None
    assert _created_id(b"data: response.created but not json\n\n") is None
