"""What the simulated node's further APIs (``apis``: the Responses API, Anthropic's Messages,
rerank and score, audio, tokenize) share with its chat completions: the node as they see it,
its faults taken as a chat takes them, its batch slots, and answers paced token by token.

The node is seen through :class:`Node`, the part of ``node.SimNode`` these modules use, so that
they need not import the module that imports them."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Protocol

import orjson
from aiohttp import web

from .answers import ApiError
from .faults import STATUS_FAULTS, ClientGone, Fault, abort
from .flavors import Flavor

MIN_SLEEP_S: Final = 0.005  # as the node's chat: shorter waits fold into the next one
SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

# An error answer of (status, message, error type, code) in the shape of the API answering.
Errors = Callable[[int, str, str, "str | None"], web.Response]


class Settings(Protocol):
    @property
    def models(self) -> tuple[str, ...]: ...

    @property
    def api_key(self) -> str | None: ...


class Node(Protocol):
    """The part of ``node.SimNode`` the further APIs use: its settings, flavor and counters,
    its fault, and the batch slots and sleeps of its chat completions."""

    served: int
    requests_total: int
    _n_running: int

    @property
    def config(self) -> Settings: ...

    @property
    def flavor(self) -> Flavor: ...

    @property
    def fault(self) -> Fault: ...

    @property
    def running(self) -> dict[str, int]: ...

    @property
    def _dt(self) -> float: ...

    @property
    def _prefill(self) -> float: ...

    @property
    def _fault_epoch(self) -> int: ...

    def _check_auth(self, request: web.Request) -> None: ...

    def _consume(self, fault: Fault) -> None: ...

    def _gone(self, request: web.Request) -> bool: ...

    async def _sleep(self, request: web.Request, seconds: float) -> None: ...

    async def _acquire(self, request: web.Request, model: str) -> None: ...

    def _release(self) -> None: ...


def new_id(prefix: str) -> str:
    """A fresh id, unique across nodes: ``prefix`` and 32 hex digits."""
    return f"{prefix}{uuid.uuid4().hex}"


def json_answer(
    obj: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers
    )


def named_event(name: str, obj: object) -> bytes:
    """One server-sent event with an ``event:`` line, as the Responses and Messages APIs send."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def openai_errors(node: Node) -> Errors:
    """Errors as the node's flavor words an OpenAI error."""
    return lambda status, message, type_, code: node.flavor.error(
        status, message, type_, None, code
    )


async def read_json(request: web.Request, errors: Errors) -> dict[str, Any]:
    """The request's JSON object, or a 400 :class:`ApiError`."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        msg = f"Invalid JSON body: {exc}"
        raise ApiError(errors(400, msg, "invalid_request_error", None)) from None
    if not isinstance(body, dict):
        msg = "The request body must be a JSON object."
        raise ApiError(errors(400, msg, "invalid_request_error", None))
    return body


def model_or_first(node: Node, body: dict[str, Any]) -> str:
    """The model ``body`` names (checked as the flavor checks it), or the node's first when it
    names none, as vLLM's pooling, tokenizer and audio endpoints take it."""
    model = body.get("model")
    if model is None or model == "":
        return node.config.models[0]
    return node.flavor.model_of({"model": model}, node.running)


def take_fault(node: Node, request: web.Request, errors: Errors) -> Fault:
    """The fault this request meets, consumed as a chat consumes it: a status fault answers at
    once (an :class:`ApiError`), ``reset`` cuts the connection (:class:`ClientGone`); the
    other modes are the caller's to play (see :func:`start` and :func:`cut_of`)."""
    fault = node.fault
    if fault.mode in ("none", "unhealthy"):
        return Fault()
    node._consume(fault)
    if (spec := STATUS_FAULTS.get(fault.mode)) is not None:
        raise ApiError(errors(spec[0], f"simulated fault: {fault.mode}", spec[1], spec[2]))
    if fault.mode == "reset":
        abort(request, rst=True)
        raise ClientGone
    return fault


async def start(node: Node, request: web.Request, fault: Fault) -> float:
    """Play ``hang`` (until the fault is changed) and ``slow`` (the extra delay, the prefill
    and tokens ``factor`` times slower), then the prefill; returns the seconds per token."""
    await _hang(node, request, fault)
    slow = fault.mode == "slow"
    factor = fault.factor if slow else 1.0
    prefill = node._prefill * factor + (fault.delay_s if slow else 0.0)
    if prefill > 0:
        await node._sleep(request, prefill)
    return node._dt * factor


async def light(node: Node, request: web.Request, errors: Errors) -> Fault:
    """The fault of a request that decodes nothing (rerank, a token count...): taken as
    :func:`take_fault` takes it, with ``hang`` and ``slow``'s extra delay played; the caller
    calls :func:`die` before it answers."""
    fault = take_fault(node, request, errors)
    await _hang(node, request, fault)
    if fault.mode == "slow" and fault.delay_s > 0:
        await node._sleep(request, fault.delay_s)
    return fault


async def _hang(node: Node, request: web.Request, fault: Fault) -> None:
    """``hang``: wait until the fault is changed by hand (or the client leaves)."""
    if fault.mode == "hang":
        epoch = node._fault_epoch
        while node._fault_epoch == epoch:
            await asyncio.sleep(0.05)
            if node._gone(request):
                raise ClientGone


def cut_of(fault: Fault) -> int | None:
    """The tokens a stream sends before ``die_mid_stream`` cuts it (None: no cut)."""
    return fault.after_tokens if fault.mode == "die_mid_stream" else None


def die(request: web.Request, fault: Fault) -> None:
    """An answer that is not streamed dies whole under ``die_mid_stream``: no answer at all."""
    if fault.mode == "die_mid_stream":
        abort(request, rst=False)
        raise ClientGone


@contextlib.asynccontextmanager
async def slot(node: Node, request: web.Request, model: str) -> AsyncIterator[None]:
    """One of the node's batch slots, held as a chat completion holds it (waiting in its queue
    when all are busy, counted in ``running`` and ``/metrics``)."""
    await node._acquire(request, model)
    node.running[model] += 1
    node._n_running += 1
    try:
        yield
    finally:
        node.running[model] -= 1
        node._n_running -= 1
        node._release()


async def paced(node: Node, request: web.Request, n: int, dt: float) -> AsyncIterator[int]:
    """The token numbers 0..n-1, each when it is decoded at ``dt`` seconds a token."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(n):
        if dt and (wait := t0 + (i + 1) * dt - loop.time()) >= MIN_SLEEP_S:
            await node._sleep(request, wait)
        yield i


def text_of(n: int) -> str:
    """The node's deterministic answer of ``n`` tokens, as its chat answers."""
    return "".join(f"tok{i} " for i in range(n))


async def decode(node: Node, request: web.Request, n: int, dt: float) -> None:
    """The time ``n`` tokens take to decode, for an answer sent whole."""
    if n and dt:
        await node._sleep(request, n * dt)


async def answer_of(
    errors: Errors, work: Callable[[], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """``await work()``, with an :class:`ApiError` answered and a client gone (or the server
    shutting down) answered as the chat answers it."""
    try:
        return await work()
    except ApiError as exc:
        return exc.response
    except ClientGone:
        return errors(503, "the node is shutting down", "server_error", None)
