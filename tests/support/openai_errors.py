"""The shape every OpenAI-compatible error answer has, from the gateway or a simulated node:
``{"error": {"message", "type", "param", "code"}}`` as JSON, and never a traceback."""

from __future__ import annotations

from typing import Any

import httpx

ERROR_FIELDS = frozenset({"message", "type", "param", "code"})


def assert_openai_error_body(body: object, code: str | None = None) -> dict[str, Any]:
    """``body`` (parsed JSON) is an OpenAI error and nothing else; returns its ``error``."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_openai_error(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, Any]:
    """The response is ``status`` with an OpenAI-shaped JSON error body and no traceback."""
    assert response.status_code == status, response.text
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith("application/json"), content_type
    assert "Traceback" not in response.text
    return assert_openai_error_body(response.json(), code)
