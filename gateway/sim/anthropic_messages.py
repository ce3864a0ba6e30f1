"""Anthropic's Messages API on the simulated node, as vLLM and SGLang serve it beside OpenAI's:
``POST /v1/messages`` (whole, or streamed as Anthropic's named events) and
``POST /v1/messages/count_tokens``, with errors in Anthropic's shape
``{"type": "error", "error": {"type", "message"}}`` and a ``request-id`` header.

The answer is the node's ``tok0 tok1 ...``, ``max_tokens`` long (``stop_reason``
``"max_tokens"``), unless ``stop_sequences`` holds one of its tokens, ``"tokK"``: then it is the
K tokens before it (``"stop_sequence"``); a turn never ends of itself. A token is a word, as the
chat counts: ``usage.input_tokens`` counts the words of ``system`` and ``messages``. It is
paced and takes a batch slot as a chat does, and meets the same faults. With ``--api-key`` the
key is taken in ``x-api-key`` (Anthropic's) or as a bearer token."""

from __future__ import annotations

import hmac
from typing import Any, Final

from aiohttp import web

from .answers import ApiError, count_words
from .faults import ClientGone, abort
from .serving import (
    SSE_HEADERS,
    Errors,
    Node,
    answer_of,
    cut_of,
    decode,
    die,
    json_answer,
    light,
    named_event,
    new_id,
    paced,
    read_json,
    slot,
    start,
    take_fault,
    text_of,
)

# Anthropic's error types by status (a 5xx it has no name for is an api_error).
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_MAX_TOKENS_LIMIT: Final = 1_000_000


def anthropic_error(status: int, message: str) -> web.Response:
    """An error answer in Anthropic's shape, its type named by its status."""
    kind = _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return json_answer(body, status, {"request-id": new_id("req_")})


def _errors(status: int, message: str, type_: str, code: str | None) -> web.Response:
    return anthropic_error(status, message)


ERRORS: Final[Errors] = _errors


def _invalid(message: str) -> ApiError:
    return ApiError(anthropic_error(400, message))


class MessagesApi:
    """The Messages API of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.create)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)

    def _check_auth(self, request: web.Request) -> None:
        key = self.node.config.api_key
        if key is None:
            return
        got = request.headers.get("x-api-key", "").encode()
        bearer = request.headers.get("Authorization", "").encode()
        if not (
            hmac.compare_digest(got, key.encode())
            or hmac.compare_digest(bearer, f"Bearer {key}".encode())
        ):
            raise ApiError(anthropic_error(401, "invalid x-api-key"))

    def _prompt(self, body: dict[str, Any]) -> tuple[str, int]:
        """The model asked for and the prompt's tokens, or a 400 or 404 :class:`ApiError`."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _invalid("model: Field required")
        if model not in self.node.running:
            raise ApiError(anthropic_error(404, f"model: {model}"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _invalid("messages: at least one message is required")
        for i, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or message.get("role") not in ("user", "assistant")
                or not isinstance(message.get("content"), str | list)
            ):
                raise _invalid(
                    f"messages.{i}: a message needs a role (user or assistant) and content"
                )
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            raise _invalid("system: Input should be a valid string or a list of text blocks")
        return model, count_words(messages) + count_words(system)

    @staticmethod
    def _length(body: dict[str, Any]) -> tuple[int, str, str | None]:
        """The answer's tokens, its ``stop_reason`` and ``stop_sequence``."""
        n = body.get("max_tokens")
        if n is None:
            raise _invalid("max_tokens: Field required")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= _MAX_TOKENS_LIMIT:
            raise _invalid("max_tokens: Input should be an integer greater than or equal to 1")
        stops = body.get("stop_sequences") or []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _invalid("stop_sequences: Input should be a valid list of strings")
        ours = [int(s[3:]) for s in stops if s.startswith("tok") and s[3:].isdigit()]
        hits = [k for k in ours if k < n and f"tok{k}" in stops]
        if hits:
            k = min(hits)
            return k, "stop_sequence", f"tok{k}"
        return n, "max_tokens", None

    async def create(self, request: web.Request) -> web.StreamResponse:
        self.node.requests_total += 1
        return await answer_of(ERRORS, lambda: self._create(request))

    async def _create(self, request: web.Request) -> web.StreamResponse:
        node = self.node
        self._check_auth(request)
        body = await read_json(request, ERRORS)
        model, words = self._prompt(body)
        n, reason, sequence = self._length(body)
        fault = take_fault(node, request, ERRORS)
        message: dict[str, Any] = {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": words, "output_tokens": 0},
        }
        async with slot(node, request, model):
            dt = await start(node, request, fault)
            if body.get("stream") is True:
                return await self._stream(request, message, n, dt, cut_of(fault), reason, sequence)
            await decode(node, request, n, dt)
            die(request, fault)
            message.update(content=[{"type": "text", "text": text_of(n)}], stop_reason=reason)
            message.update(
                stop_sequence=sequence, usage={"input_tokens": words, "output_tokens": n}
            )
            node.served += 1
            return json_answer(message, headers={"request-id": new_id("req_")})

    async def _stream(
        self,
        request: web.Request,
        message: dict[str, Any],
        n: int,
        dt: float,
        cut: int | None,
        reason: str,
        sequence: str | None,
    ) -> web.StreamResponse:
        """Anthropic's events: the message, its text block a delta per token, the end."""

        def event(kind: str, **fields: Any) -> bytes:
            return named_event(kind, {"type": kind, **fields})

        resp = web.StreamResponse(headers={**SSE_HEADERS, "request-id": new_id("req_")})
        words = message["usage"]["input_tokens"]
        try:
            await resp.prepare(request)
            first = {**message, "usage": {"input_tokens": words, "output_tokens": min(n, 1)}}
            opening = [
                event("message_start", message=first),
                event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
                event("ping"),
            ]
            await resp.write(b"".join(opening))
            async for i in paced(self.node, request, n if cut is None else min(n, cut), dt):
                delta = {"type": "text_delta", "text": f"tok{i} "}
                await resp.write(event("content_block_delta", index=0, delta=delta))
            if cut is not None:
                abort(request, rst=False)
                return resp
            closing = [
                event("content_block_stop", index=0),
                event(
                    "message_delta",
                    delta={"stop_reason": reason, "stop_sequence": sequence},
                    usage={"output_tokens": n},
                ),
                event("message_stop"),
            ]
            await resp.write(b"".join(closing))
        except (ConnectionError, ClientGone):
            return resp
        self.node.served += 1
        return resp

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        """``{"input_tokens": n}``: the prompt's tokens, as an answer would count them."""

        async def work() -> web.StreamResponse:
            self._check_auth(request)
            body = await read_json(request, ERRORS)
            _, words = self._prompt(body)
            fault = await light(self.node, request, ERRORS)
            die(request, fault)
            return json_answer({"input_tokens": words}, headers={"request-id": new_id("req_")})

        return await answer_of(ERRORS, work)
