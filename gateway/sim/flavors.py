"""What a simulated node shows of the engine it stands for (``--flavor``): the simulator's own
shapes (``sim``, the default: OpenAI's answers, vLLM's metric names), vLLM's, or llama.cpp's
``llama-server``'s. Each difference was seen on the real server (tests/e2e/engines, and the
answers saved from vLLM 0.32.0 in tests/unit/data) and is mirrored here, so the fast tests meet
what fleetgate meets in front of real engines. A flavor is a stateless :class:`Flavor`: the node
asks it how to check a request, shape an answer, a stream event, a usage or an error; whatever
a flavor does not override is the simulator's own.

The vLLM flavor, as ``vllm.entrypoints.openai.api_server`` answers with
``--enable-prefix-caching --enable-prompt-tokens-details``:

- while the model loads (``--loading-s``) nothing listens: connections are refused; the socket
  is bound once it has loaded (llama-server, and the simulator, answer 503 instead).
- ``/health`` is a 200 with an empty body and no content type.
- ``/v1/models`` entries add ``root``, ``parent`` (null), ``max_model_len`` and ``permission``,
  ``owned_by`` is ``"vllm"``.
- a chat stream opens with a chunk of ``{"role": "assistant", "content": ""}`` alone; the last
  token's chunk carries ``finish_reason`` (no empty final chunk); with
  ``stream_options.include_usage`` a chunk of no choices carries the usage before ``[DONE]``,
  and without it no chunk carries a usage.
- usage always has ``prompt_tokens_details.cached_tokens`` (0 when nothing was cached): it
  has a prefix cache by default (kvcache.py, sized for every slot to hold a whole context), so
  cached tokens come in whole blocks and never the whole prompt.
- errors are ``{"error": {"message", "type", "param", "code"}}`` with ``type`` an exception
  name (``NotFoundError``, ``BadRequestError``) and ``code`` the integer status; unknown paths
  answer FastAPI's ``{"detail": "Not Found"}``; a missing model is the served one; empty
  ``messages``, ``max_tokens`` below 1 or above the context, and a prompt longer than the
  context are 400s; otherwise ``max_tokens`` is cut to the context left after the prompt,
  which it fills when absent from a chat (a text completion's default is 16).
- ``/metrics``: ``vllm:*`` series labelled ``{engine="0",model_name="..."}``, the KV-cache
  use a fraction of the blocks running requests take, the prefix cache's queries and hits,
  the cached prompt tokens and the waiting requests by reason (all of one reason).

The llama.cpp flavor, as ``llama-server`` answers with ``--metrics`` and ``--slots``:

- ``/metrics``: ``llamacpp:requests_processing`` and ``llamacpp:requests_deferred``, no labels,
  and no KV-cache gauge; the KV figure is in ``/slots``, one object per request slot. A busy
  simulated slot holds its whole context, so the figure read from it equals the simulator's
  gauge (running over slots).
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
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .answers import ApiError, count_words, error_response, max_tokens
from .metrics import label

FLAVORS: Final = ("sim", "vllm", "llamacpp")
CONTEXT_TOKENS: Final = 4096  # a llama.cpp slot's n_ctx, vLLM's max_model_len
SLOT_CONTEXT: Final = CONTEXT_TOKENS
_VLLM_FINGERPRINT: Final = "vllm-0.32.0-fleetgate-sim"
_COMPLETION_MAX_TOKENS: Final = 16  # vLLM's default for /v1/completions (chats fill the context)
# vLLM's error types: its exception names where it has one, else the status's phrase.
_VLLM_ERROR_TYPES: Final = {
    400: "BadRequestError",
    404: "NotFoundError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}

UsageOf = Callable[[], dict[str, Any]]


class Flavor:
    """The simulator's own shapes (``--flavor sim``); each engine's flavor overrides where its
    server differs."""

    name = "sim"
    listens_while_loading = True  # False: binds its socket only once loaded

    def cache_blocks(self, slots: int, block_tokens: int) -> int:
        """The prefix cache it has when ``--cache-blocks`` says nothing (0: none)."""
        return 0

    def middlewares(self, loading_s: float, loaded_at: float) -> list[Middleware]:
        return [loading(loaded_at)] if loading_s > 0 else []

    def error(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> web.Response:
        """An error answer of ``status``; ``type_`` and ``code`` are OpenAI's names of it."""
        return error_response(status, message, type_, param, code)

    def model_of(self, body: dict[str, Any], models: Mapping[str, object]) -> str:
        """The requested model, one of ``models``, or an :class:`ApiError`."""
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(self.error(400, "You must provide a model parameter.", param="model"))
        if model not in models:
            msg = f"The model `{model}` does not exist."
            raise ApiError(self.error(404, msg, param="model", code="model_not_found"))
        return model

    def max_tokens(self, kind: str, body: dict[str, Any]) -> int:
        """The tokens to generate for a chat or text completion, or an :class:`ApiError`."""
        return max_tokens(body)

    def models_body(self, models: tuple[str, ...], created: int) -> dict[str, Any]:
        """The ``/v1/models`` answer."""
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "fleetgate-sim"}
            for m in models
        ]
        return {"object": "list", "data": data}

    def health(self) -> web.Response:
        return web.Response(body=orjson.dumps({"status": "ok"}), content_type="application/json")

    def usage(
        self, kind: str, found: dict[str, Any], cached: int | None, created: int, streamed: bool
    ) -> dict[str, Any]:
        """``found`` (the plain usage) with what the engine tells of its cache: ``cached``
        prompt tokens (None without a cache), ``created`` newly cached ones."""
        if cached is not None:
            found["prompt_tokens_details"] = {"cached_tokens": cached}
        return found

    def answer(self, kind: str, answer: dict[str, Any]) -> dict[str, Any]:
        """A whole (unstreamed) chat or text completion as the engine words it."""
        return answer

    def opening(self, chat: bool, head: dict[str, Any]) -> list[dict[str, Any]]:
        """The stream's events before its first token."""
        return []

    def token(
        self, chat: bool, head: dict[str, Any], i: int, text: str, last: bool, asked: bool
    ) -> dict[str, Any]:
        """The event of token ``i`` (``last``: the answer's last; ``asked``: the client asked
        for a usage event)."""
        choice: dict[str, Any]
        if chat:
            delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice["logprobs"] = choice["finish_reason"] = None
        return {**head, "choices": [choice]}

    def closing(
        self, chat: bool, head: dict[str, Any], usage: UsageOf, asked: bool
    ) -> list[dict[str, Any]]:
        """The events after the last token, before ``[DONE]``: an empty choice that finishes
        it, then the usage when ``asked``."""
        end: dict[str, Any] = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
        end["logprobs"], end["finish_reason"] = None, "length"
        events = [{**head, "choices": [end]}]
        if asked:
            events.append({**head, "choices": [], "usage": usage()})
        return events


class LlamaCpp(Flavor):
    """llama.cpp's ``llama-server`` (see the module's docstring)."""

    name = "llamacpp"

    def models_body(self, models: tuple[str, ...], created: int) -> dict[str, Any]:
        meta = {"vocab_type": 1, "n_vocab": 32000, "n_ctx": SLOT_CONTEXT, "n_ctx_train": 16384}
        return {
            "models": [
                {"name": m, "model": m, "type": "model", "capabilities": ["completion"]}
                for m in models
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

    def usage(
        self, kind: str, found: dict[str, Any], cached: int | None, created: int, streamed: bool
    ) -> dict[str, Any]:
        found["prompt_tokens_details"] = {"cached_tokens": cached or 0}
        return found

    def opening(self, chat: bool, head: dict[str, Any]) -> list[dict[str, Any]]:
        if not chat:
            return []
        return [
            {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}
        ]

    def closing(
        self, chat: bool, head: dict[str, Any], usage: UsageOf, asked: bool
    ) -> list[dict[str, Any]]:
        if chat:
            return super().closing(chat, head, usage, asked)
        # A completion stream: the usage on the last choice, asked for or not.
        end = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
        return [{**head, "choices": [end], "usage": usage()}]


class Vllm(Flavor):
    """vLLM's OpenAI server (see the module's docstring)."""

    name = "vllm"
    listens_while_loading = False

    def cache_blocks(self, slots: int, block_tokens: int) -> int:
        return slots * -(-CONTEXT_TOKENS // block_tokens)

    def middlewares(self, loading_s: float, loaded_at: float) -> list[Middleware]:
        return [fastapi_errors]

    def error(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> web.Response:
        if status == 401:  # vLLM's --api-key middleware
            return web.json_response({"error": "Unauthorized"}, status=401)
        name = _VLLM_ERROR_TYPES.get(status) or HTTPStatus(status).phrase
        body = {"error": {"message": message, "type": name, "param": param, "code": status}}
        return web.json_response(body, status=status, dumps=_dumps)

    def model_of(self, body: dict[str, Any], models: Mapping[str, object]) -> str:
        model = body.get("model")
        if model is None or model == "":  # vLLM serves its model to a request that names none
            return next(iter(models))
        if not isinstance(model, str):
            raise ApiError(self._invalid("string_type", "model", "Input should be a valid string"))
        if model not in models:
            msg = f"The model `{model}` does not exist. Valid aliases: {', '.join(models)}."
            raise ApiError(self.error(404, msg, param="model"))
        return model

    def max_tokens(self, kind: str, body: dict[str, Any]) -> int:
        chat = kind == "chat"
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise ApiError(self._invalid("missing", "messages", "Field required"))
            if not messages:
                msg = (
                    "Cannot apply chat template to an empty conversation. "
                    "Provide at least one message."
                )
                raise ApiError(self.error(400, msg))
        completion_name = chat and body.get("max_completion_tokens") is not None
        name = "max_completion_tokens" if completion_name else "max_tokens"
        asked = body.get(name)
        if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool)):
            msg = "Input should be a valid integer"
            raise ApiError(self._invalid("int_parsing", name, msg))
        context = CONTEXT_TOKENS
        if asked is not None and asked > context:
            raise ApiError(
                self._check(
                    f"{name}={asked} cannot be greater than max_model_len={context}. "
                    "Please request fewer output tokens.",
                    name,
                    asked,
                )
            )
        prompt = count_words(body.get("messages") if chat else body.get("prompt"))
        if prompt > context:
            # Its tokenizer stops one token past the context, hence "at least".
            seen = context + 1
            raise ApiError(
                self._check(
                    f"This model's maximum context length is {context} tokens. However, your "
                    f"prompt contains at least {seen} input tokens, which exceeds this limit "
                    "even without any output tokens. Please reduce the length of the input "
                    "prompt.",
                    "input_tokens",
                    seen,
                )
            )
        default = None if chat else _COMPLETION_MAX_TOKENS
        n = min(context - prompt, asked if asked is not None else default or context)
        if n < 1:
            raise ApiError(self._check(f"max_tokens must be at least 1, got {n}.", "max_tokens", n))
        return n

    def _check(self, message: str, param: str, value: int) -> web.Response:
        """A 400 of vLLM's validation of a request's values."""
        return self.error(400, f"{message} (parameter={param}, value={value})", param=param)

    def _invalid(self, error: str, field: str, text: str) -> web.Response:
        """A 400 of FastAPI's validation of a request's body (pydantic's words)."""
        detail = f"{{'type': '{error}', 'loc': 'body.{field}', 'msg': '{text}'}}"
        body = {
            "error": {
                "message": f"1 validation error:\n  {detail}",
                "type": "Bad Request",
                "param": f"body.{field}",
                "code": 400,
            }
        }
        return web.json_response(body, status=400, dumps=_dumps)

    def models_body(self, models: tuple[str, ...], created: int) -> dict[str, Any]:
        permission = {
            "object": "model_permission",
            "created": created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        data = [
            {
                "id": m,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": f"/models/{m}",
                "parent": None,
                "max_model_len": CONTEXT_TOKENS,
                "permission": [{"id": f"modelperm-sim{i}", **permission}],
            }
            for i, m in enumerate(models)
        ]
        return {"object": "list", "data": data}

    def health(self) -> web.Response:
        return web.Response()  # no body, no content type

    def usage(
        self, kind: str, found: dict[str, Any], cached: int | None, created: int, streamed: bool
    ) -> dict[str, Any]:
        prompt, completion = found["prompt_tokens"], found["completion_tokens"]
        details: dict[str, Any] = {"cached_tokens": cached or 0}
        # Only chats report the tokens they cached anew (a plain completion says null).
        if kind == "chat":
            details["created_cache_tokens"] = created
        elif not streamed:
            details["created_cache_tokens"] = None
        if not streamed:  # a stream's usage leaves its nulls out
            details["multimodal_tokens"] = None
        usage = {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": details,
        }
        return usage if streamed else {**usage, "completion_tokens_details": None}

    def answer(self, kind: str, answer: dict[str, Any]) -> dict[str, Any]:
        choice = answer["choices"][0]
        extra: dict[str, Any] = {"stop_reason": None, "token_ids": None}
        if kind == "chat":
            nulls = ("refusal", "annotations", "audio", "function_call", "reasoning")
            choice["message"].update(dict.fromkeys(nulls))
            extra["routed_experts"] = None
            tail: tuple[str, ...] = ("prompt_logprobs", "prompt_token_ids", "prompt_text")
        else:
            extra.update(prompt_logprobs=None, prompt_token_ids=None, routed_experts=None)
            tail = ()
        choice.update(extra)
        usage = answer.pop("usage")
        answer.update(service_tier=None, system_fingerprint=_VLLM_FINGERPRINT, usage=usage)
        answer.update(dict.fromkeys((*tail, "kv_transfer_params", "ec_transfer_params")))
        answer["metrics"] = None
        return answer

    def opening(self, chat: bool, head: dict[str, Any]) -> list[dict[str, Any]]:
        if not chat:
            return []
        delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return [{**head, "choices": [choice], "prompt_token_ids": None, "prompt_text": None}]

    def token(
        self, chat: bool, head: dict[str, Any], i: int, text: str, last: bool, asked: bool
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice.update(delta={"content": text}, logprobs=None)
        else:
            choice.update(text=text, logprobs=None)
        choice["finish_reason"] = "length" if last else None
        if last or not chat:
            choice["stop_reason"] = None
        if not chat:
            choice["prompt_token_ids"] = None
        choice["token_ids"] = None
        event = {**head, "choices": [choice]}
        if last and not asked:  # else the usage event carries it
            event["system_fingerprint"] = _VLLM_FINGERPRINT
        return event

    def closing(
        self, chat: bool, head: dict[str, Any], usage: UsageOf, asked: bool
    ) -> list[dict[str, Any]]:
        if not asked:
            return []
        usage_event = {**head, "choices": [], "usage": usage()}
        return [{**usage_event, "system_fingerprint": _VLLM_FINGERPRINT}]


_BY_NAME: Final[dict[str, Flavor]] = {f.name: f for f in (Flavor(), Vllm(), LlamaCpp())}


def of(name: str) -> Flavor:
    """The flavor called ``name`` (one of :data:`FLAVORS`)."""
    return _BY_NAME[name]


def _dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()


@web.middleware
async def fastapi_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """FastAPI's answers to a path it does not route, or a method it does not take there."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.json_response({"detail": "Not Found"}, status=404)
    except web.HTTPMethodNotAllowed as exc:
        allow = ", ".join(sorted(exc.allowed_methods))
        answer = web.json_response({"detail": "Method Not Allowed"}, status=405)
        answer.headers["Allow"] = allow
        return answer


def loading_answer() -> web.Response:
    """llama-server's answer to any request while its model loads."""
    body = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    return web.Response(
        body=orjson.dumps(body), status=503, content_type="application/json", charset="utf-8"
    )


def loading(loaded_at: float) -> Middleware:
    """A middleware answering as llama-server while its model loads, until ``loaded_at``
    (``time.monotonic()``); the simulator's own ``/sim/*`` paths stay open."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if time.monotonic() < loaded_at and not request.path.startswith("/sim/"):
            return loading_answer()
        return await handler(request)

    return middleware


def llamacpp_metric_lines(
    running: int, waiting: int, cached_total: int, prefilled_total: int
) -> list[str]:
    """llama-server's figures of its slots and prefix cache, as it names them (unlabelled; no
    KV-cache gauge in its version). Its ``prompt_tokens_total`` counts only the prompt tokens
    it prefilled, the cached ones apart."""
    lines: list[str] = []
    for name, kind, value, text in (
        ("prompt_tokens_total", "counter", prefilled_total, "Number of prompt tokens processed"),
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


def vllm_metric_lines(
    running: Mapping[str, int],
    waiting: Mapping[str, int],
    kv_usage: float,
    queries: Mapping[str, int],
    hits: Mapping[str, int],
) -> list[str]:
    """vLLM's series the checker and the benchmarks read, per model, labelled as vLLM labels
    them (engine 0: one engine core); ``kv_usage`` (0..1) is the engine's, on every model."""
    lines: list[str] = []

    def series(metric: str, kind: str, text: str, values: Mapping[str, float]) -> None:
        lines.extend((f"# HELP vllm:{metric} {text}", f"# TYPE vllm:{metric} {kind}"))
        for model, value in values.items():
            lines.append(f'vllm:{metric}{{engine="0",model_name="{label(model)}"}} {float(value)}')

    series(
        "num_requests_running", "gauge", "Number of requests in model execution batches.", running
    )
    series("num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting)
    lines += [
        "# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason.",
        "# TYPE vllm:num_requests_waiting_by_reason gauge",
    ]
    for model, value in waiting.items():
        # The simulated queue waits for a slot only: vLLM's "capacity"; nothing is "deferred".
        for reason, count in (("capacity", value), ("deferred", 0)):
            lines.append(
                f'vllm:num_requests_waiting_by_reason{{engine="0",model_name="{label(model)}",'
                f'reason="{reason}"}} {float(count)}'
            )
    series(
        "kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        dict.fromkeys(running, kv_usage),
    )
    series("prefix_cache_queries_total", "counter", "Prefix cache queries, in tokens.", queries)
    series("prefix_cache_hits_total", "counter", "Prefix cache hits, in tokens.", hits)
    series("prompt_tokens_cached_total", "counter", "Number of cached prompt tokens.", hits)
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


class PrefixCache:
    """The prefix cache of one llama.cpp slot, over words: a prompt finds the words it shares,
    as a prefix, with the one before, then takes its place. Never the whole prompt: like
    llama-server, the last token is evaluated again to have logits to sample from."""

    def __init__(self) -> None:
        self.last: list[str] = []
        self.cached_total = 0  # llamacpp:prompt_tokens_cached_total
        self.prefilled_total = 0  # llamacpp:prompt_tokens_total: the tokens it had to prefill

    def hit(self, words: list[str]) -> int:
        shared = 0
        for mine, theirs in zip(self.last, words, strict=False):
            if mine != theirs:
                break
            shared += 1
        cached = max(min(shared, len(words) - 1), 0)
        self.last = words
        self.cached_total += cached
        self.prefilled_total += len(words) - cached
        return cached
