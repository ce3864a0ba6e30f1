"""The OpenAI answer shapes of the simulated node: completions, embeddings, usage, errors and
server-sent events, with a deterministic stand-in for a tokenizer (one token per word)."""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from typing import Any, Final

import orjson
from aiohttp import web

_MAX_TOKENS_LIMIT: Final = 1_000_000


class ApiError(Exception):
    """Raised anywhere in a handler to answer with an OpenAI-shaped error."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> web.Response:
    """An OpenAI-shaped error answer (with ``Retry-After`` where a client should come back)."""
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def sse(obj: object) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def count_words(value: object) -> int:
    """Deterministic stand-in for a tokenizer: words in strings, one per token id."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        return count_words(value.get("content")) + count_words(value.get("text"))
    return 0


def prompt_words(value: object) -> list[str]:
    """The words of a prompt or of chat messages, in order (what :func:`count_words` counts)."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, int):
        return [str(value)]
    if isinstance(value, list):
        return [w for v in value for w in prompt_words(v)]
    if isinstance(value, dict):
        return prompt_words(value.get("content")) + prompt_words(value.get("text"))
    return []


def max_tokens(body: dict[str, Any]) -> int:
    """The tokens to generate (16 unless the body says), or a 400 :class:`ApiError`."""
    n = body.get("max_completion_tokens")
    if n is None:
        n = body.get("max_tokens")
    if n is None:
        return 16
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= _MAX_TOKENS_LIMIT:
        msg = "max_tokens must be a non-negative integer"
        raise ApiError(error_response(400, msg, param="max_tokens"))
    return n


def embedding(item: object) -> list[float]:
    """A deterministic 8-dimensional vector of ``item``."""
    digest = hashlib.blake2b(orjson.dumps(item), digest_size=8).digest()
    return [round((b - 127.5) / 127.5, 6) for b in digest]


def usage(kind: str, body: dict[str, Any], n: int) -> dict[str, int]:
    """The usage object of an answer of ``n`` tokens to ``body``."""
    prompt = count_words(body.get("messages") if kind == "chat" else body.get("prompt"))
    return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}


def completion_body(
    kind: str,
    body: dict[str, Any],
    model: str,
    n: int,
    seq: int,
    usage_: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole chat or text completion of ``n`` tokens; ``seq`` numbers its id; ``usage_``
    replaces the plain :func:`usage`."""
    text = "".join([f"tok{i} " for i in range(n)])
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
        rid, obj = f"chatcmpl-sim{seq}", "chat.completion"
    else:
        choice["text"] = text
        rid, obj = f"cmpl-sim{seq}", "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage_ if usage_ is not None else usage(kind, body, n),
    }


def embeddings_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The embeddings answer to ``body``: one deterministic vector per input."""
    inp = body.get("input")
    if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)):
        items: list[Any] = [inp]
    elif isinstance(inp, list) and inp and all(isinstance(x, str | list) for x in inp):
        items = inp
    else:
        raise ApiError(
            error_response(400, "input must be a string or a list of strings", param="input")
        )
    b64 = body.get("encoding_format") == "base64"  # the openai SDK asks for this by default
    data = []
    for i, item in enumerate(items):
        vec = embedding(item)
        emb: object = base64.b64encode(struct.pack("<8f", *vec)).decode() if b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    prompt = count_words(items)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }
