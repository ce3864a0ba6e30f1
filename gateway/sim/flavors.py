"""What a simulated node shows of the engine it stands for (``--flavor``): vLLM by default, or
llama.cpp's ``llama-server``, whose HTTP differs in ways fleetgate must handle, each seen on
the real server (tests/e2e/engines) and mirrored here so the fast tests meet it too.

The llama.cpp flavor, as ``llama-server`` answers with ``--metrics`` and ``--slots``:

- ``/metrics``: ``llamacpp:requests_processing`` and ``llamacpp:requests_deferred``, no labels,
  and no KV-cache gauge; the KV figure is in ``/slots``, one object per request slot. A busy
  simulated slot holds its whole context, so the figure read from it equals the vLLM
  flavor's gauge (running over slots).
- ``/v1/models``: the OpenAI ``data`` list (with ``aliases``, ``tags`` and ``meta``), beside an
  Ollama-style ``models`` list.
- While the model loads (``--loading-s``), every path, ``/health`` included, answers 503 with
  ``{"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}``.
- A chat stream opens with a chunk carrying only the role (``"content": null``); a text
  completion stream carries usage on its last choice whether or not it was asked for.
- usage carries ``prompt_tokens_details.cached_tokens``: the words of the prompt shared, as a
  prefix, with the previous prompt (the simulated prefix cache of one slot); with
  ``--cache-blocks`` the node's block cache (kvcache.py) counts them instead, still reported
  under llama-server's names.
"""

from __future__ import annotations

import time
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

FLAVORS: Final = ("vllm", "llamacpp")
SLOT_CONTEXT: Final = 4096  # tokens of context a simulated llama.cpp slot reports


def loading_answer() -> web.Response:
    """llama-server's answer to any request while its model loads."""
    body = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    return web.Response(
        body=orjson.dumps(body), status=503, content_type="application/json", charset="utf-8"
    )


def models_body(flavor: str, models: tuple[str, ...], created: int) -> dict[str, Any]:
    """The ``/v1/models`` answer of the flavor."""
    if flavor != "llamacpp":
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "fleetgate-sim"}
            for m in models
        ]
        return {"object": "list", "data": data}
    meta = {"vocab_type": 1, "n_vocab": 32000, "n_ctx": SLOT_CONTEXT, "n_ctx_train": 16384}
    return {
        "models": [
            {"name": m, "model": m, "type": "model", "capabilities": ["completion"]} for m in models
        ],
        "object": "list",
        "data": [
            {
                "id": m,
                "aliases": [m],
                "tags": [],
                "object": "model",
                "created": created,
                "owned_by": "llamacpp",
                "meta": meta,
            }
            for m in models
        ],
    }


def llamacpp_metric_lines(running: int, waiting: int, cached_total: int) -> list[str]:
    """llama-server's figures of its slots and prefix cache, as it names them (unlabelled; no
    KV-cache gauge in its version)."""
    lines: list[str] = []
    for name, kind, value, text in (
        ("prompt_tokens_cached_total", "counter", cached_total, "Prompt tokens from the cache"),
        ("requests_processing", "gauge", running, "Number of requests processing"),
        ("requests_deferred", "gauge", waiting, "Number of requests deferred"),
    ):
        lines += [
            f"# HELP llamacpp:{name} {text}",
            f"# TYPE llamacpp:{name} {kind}",
            f"llamacpp:{name} {value}",
        ]
    return lines


def slots_body(slots: int, busy: int) -> list[dict[str, Any]]:
    """llama-server's ``/slots``: the first ``busy`` slots processing, each holding its whole
    context (see the module's docstring), the others idle and empty."""
    return [
        {
            "id": i,
            "n_ctx": SLOT_CONTEXT,
            "speculative": False,
            "is_processing": i < busy,
            **({"n_prompt_tokens": SLOT_CONTEXT} if i < busy else {}),
        }
        for i in range(slots)
    ]


def loading(loaded_at: float) -> Middleware:
    """A middleware answering as llama-server while its model loads, until ``loaded_at``
    (``time.monotonic()``); the simulator's own ``/sim/*`` paths stay open."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if time.monotonic() < loaded_at and not request.path.startswith("/sim/"):
            return loading_answer()
        return await handler(request)

    return middleware


class PrefixCache:
    """The prefix cache of one llama.cpp slot, over words: a prompt finds the words it shares,
    as a prefix, with the one before, then takes its place. Never the whole prompt: like
    llama-server, the last token is evaluated again to have logits to sample from."""

    def __init__(self) -> None:
        self.last: list[str] = []
        self.cached_total = 0  # llamacpp:prompt_tokens_cached_total

    def hit(self, words: list[str]) -> int:
        shared = 0
        for mine, theirs in zip(self.last, words, strict=False):
            if mine != theirs:
                break
            shared += 1
        cached = max(min(shared, len(words) - 1), 0)
        self.last = words
        self.cached_total += cached
        return cached
