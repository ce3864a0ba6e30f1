"""OpenAI's Responses API on the simulated node, with its state: ``POST /v1/responses`` (whole or
streamed as typed events, in the foreground or in the ``background``), and, for a response it
stored, ``GET`` and ``DELETE /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel`` and
``GET /v1/responses/{id}/input_items``.

A response is kept (``store``, true by default) in this node's memory only: its id
(``resp_`` and 32 hex digits) is unknown to every other node, as a response is to every engine
but the one that served it, so ``previous_response_id`` must reach the node that holds it. A
continued response answers the whole conversation: the earlier turns' input and output, then
its own input, all counted in ``usage.input_tokens`` (a word a token, as the chat counts) and
listed by ``input_items``; an unknown ``previous_response_id`` is a 404 worded as vLLM words it.

The answer is the node's ``tok0 tok1 ...``, ``max_output_tokens`` long (16 by default), at the
node's pace, in one of its batch slots; faults are played as in a chat. A background response
is ``queued``, then ``in_progress`` (taking no batch slot), then ``completed``, unless
cancelled; a foreground one cut short (``die_mid_stream``, a client gone) is stored ``failed``."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from .answers import ApiError, count_words, error_response
from .faults import ClientGone, Fault, abort
from .serving import (
    SSE_HEADERS,
    Node,
    answer_of,
    cut_of,
    decode,
    die,
    json_answer,
    named_event,
    new_id,
    openai_errors,
    paced,
    read_json,
    slot,
    start,
    take_fault,
    text_of,
)

_DEFAULT_OUTPUT_TOKENS: Final = 16  # as a chat that does not say
_MAX_OUTPUT_TOKENS: Final = 1_000_000
_ROLES: Final = frozenset({"user", "assistant", "system", "developer"})


@dataclass(slots=True)
class Stored:
    response: dict[str, Any]  # the Response object, as retrieved
    items: list[dict[str, Any]]  # what it answered: earlier turns' input and output, its input
    task: asyncio.Task[None] | None = None  # a background response's generation


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_part(text)]
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


class ResponsesApi:
    """The Responses API of one node, and the responses it stored."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.store: dict[str, Stored] = {}
        self._errors = openai_errors(node)

    def add_routes(self, app: web.Application) -> None:
        router = app.router
        router.add_post("/v1/responses", self.create)
        router.add_get("/v1/responses/{response_id}", self.retrieve)
        router.add_delete("/v1/responses/{response_id}", self.delete)
        router.add_post("/v1/responses/{response_id}/cancel", self.cancel)
        router.add_get("/v1/responses/{response_id}/input_items", self.input_items)
        app.on_shutdown.append(self.close)

    async def close(self, app: web.Application) -> None:
        """Stop the background responses still being generated."""
        tasks = [s.task for s in self.store.values() if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- errors and request parts ---------------------------------------------------------
    def _error(
        self, status: int, message: str, param: str | None, code: str | None = None
    ) -> ApiError:
        if self.node.flavor.name == "vllm":  # vLLM's responses errors: its type, the status
            error = {"message": message, "type": "invalid_request_error", "param": param}
            return ApiError(json_answer({"error": {**error, "code": status}}, status))
        return ApiError(error_response(status, message, "invalid_request_error", param, code))

    def _not_found(self, response_id: str, param: str = "response_id") -> ApiError:
        code = "previous_response_not_found" if param == "previous_response_id" else None
        return self._error(404, f"Response with id '{response_id}' not found.", param, code)

    def _output_tokens(self, body: dict[str, Any]) -> int:
        n = body.get("max_output_tokens")
        if n is None:
            return _DEFAULT_OUTPUT_TOKENS
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= _MAX_OUTPUT_TOKENS:
            msg = "Invalid 'max_output_tokens': expected a non-negative integer."
            raise self._error(400, msg, "max_output_tokens", "invalid_value")
        return n

    def _input(self, value: object) -> list[dict[str, Any]]:
        """The input items of a request (a string is one user message), each with an id."""
        if isinstance(value, str):
            value = [{"role": "user", "content": value}]
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            msg = "Invalid 'input': expected a string or a list of input items."
            raise self._error(400, msg, "input", "invalid_type")
        items: list[dict[str, Any]] = []
        for item in value:
            if item.get("type", "message") != "message":  # a tool call's output, etc.: as given
                items.append({"id": new_id("item_"), **item})
                continue
            role, content = item.get("role"), item.get("content")
            if role not in _ROLES or not isinstance(content, str | list):
                msg = "Invalid 'input': a message needs a role and a string or list content."
                raise self._error(400, msg, "input", "invalid_value")
            if isinstance(content, str):
                part = {"type": "input_text", "text": content}
                content = [_part(content) if role == "assistant" else part]
            items.append(
                {
                    "id": item.get("id") or new_id("msg_"),
                    "type": "message",
                    "role": role,
                    "content": content,
                    "status": item.get("status", "completed"),
                }
            )
        return items

    def _stored(self, request: web.Request) -> tuple[str, Stored]:
        self.node._check_auth(request)
        response_id = request.match_info["response_id"]
        stored = self.store.get(response_id)
        if stored is None:
            raise self._not_found(response_id)
        return response_id, stored

    # --- creating a response ---------------------------------------------------------------
    async def create(self, request: web.Request) -> web.StreamResponse:
        self.node.requests_total += 1
        return await answer_of(self._errors, lambda: self._create(request))

    async def _create(self, request: web.Request) -> web.StreamResponse:
        node = self.node
        node._check_auth(request)
        body = await read_json(request, self._errors)
        model = node.flavor.model_of(body, node.running)
        n = self._output_tokens(body)
        previous = body.get("previous_response_id")
        earlier: list[dict[str, Any]] = []
        if previous is not None:
            found = self.store.get(previous) if isinstance(previous, str) else None
            if found is None:
                raise self._not_found(str(previous), "previous_response_id")
            earlier = [*found.items, *found.response["output"]]
        if "input" not in body and previous is None:
            raise self._error(400, "Missing required parameter: 'input'.", "input", "missing")
        items = self._input(body.get("input", []))
        store = body.get("store") is not False
        background = body.get("background") is True
        stream = body.get("stream") is True
        if background and (stream or not store):
            msg = "A background response must be stored (store=true) and is not streamed here."
            raise self._error(400, msg, "background", "invalid_value")
        fault = take_fault(node, request, self._errors)
        conversation = [*earlier, *items]
        words = count_words(conversation) + count_words(body.get("instructions"))
        usage = {
            "input_tokens": words,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": words + n,
        }
        response = self._skeleton(body, model, store, background)
        stored = Stored(response, conversation)
        if background:
            self.store[response["id"]] = stored
            response["status"] = "queued"
            answer = json_answer(response)  # as it is now: the task changes it from here on
            stored.task = asyncio.create_task(self._background(stored, n, usage, fault))
            return answer
        try:
            async with slot(node, request, model):
                if store:  # from now on: retrieved in progress while it is generated
                    self.store[response["id"]] = stored
                dt = await start(node, request, fault)
                if stream:
                    return await self._stream(request, response, n, dt, usage, cut_of(fault))
                await decode(node, request, n, dt)
                die(request, fault)
                self._complete(response, n, usage, new_id("msg_"))
                node.served += 1
                return json_answer(response)
        finally:
            if response["status"] == "in_progress":  # cut short: what it stored says so
                response["status"] = "failed"
                message = "The simulated node did not complete the answer."
                response["error"] = {"code": "server_error", "message": message}

    def _skeleton(
        self, body: dict[str, Any], model: str, store: bool, background: bool
    ) -> dict[str, Any]:
        """The response in progress: no output, no usage yet."""
        return {
            "id": new_id("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": background,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": body.get("max_tool_calls"),
            "model": model,
            "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": store,
            "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation") or "disabled",
            "usage": None,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }

    @staticmethod
    def _complete(response: dict[str, Any], n: int, usage: dict[str, Any], item_id: str) -> None:
        item = _message(item_id, text_of(n), "completed")
        response.update(status="completed", completed_at=int(time.time()), output=[item])
        response["usage"] = usage

    async def _stream(
        self,
        request: web.Request,
        response: dict[str, Any],
        n: int,
        dt: float,
        usage: dict[str, Any],
        cut: int | None,
    ) -> web.StreamResponse:
        """The typed events of the Responses API, a delta per token, each numbered."""
        numbers = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            return named_event(kind, {"type": kind, "sequence_number": next(numbers), **fields})

        resp = web.StreamResponse(headers=SSE_HEADERS)
        item_id = new_id("msg_")
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        try:
            await resp.prepare(request)
            opening = [
                event("response.created", response=response),
                event("response.in_progress", response=response),
                event(
                    "response.output_item.added",
                    output_index=0,
                    item=_message(item_id, None, "in_progress"),
                ),
                event("response.content_part.added", **where, part=_part("")),
            ]
            await resp.write(b"".join(opening))
            async for i in paced(self.node, request, n if cut is None else min(n, cut), dt):
                delta = event("response.output_text.delta", **where, delta=f"tok{i} ", logprobs=[])
                await resp.write(delta)  # one write per token, as engines flush them
            if cut is not None:
                abort(request, rst=False)
                return resp
            self._complete(response, n, usage, item_id)
            item = response["output"][0]
            text = text_of(n)
            closing = [
                event("response.output_text.done", **where, text=text, logprobs=[]),
                event("response.content_part.done", **where, part=_part(text)),
                event("response.output_item.done", output_index=0, item=item),
                event("response.completed", response=response),
            ]
            await resp.write(b"".join(closing))
        except (ConnectionError, ClientGone):
            return resp  # aiohttp's write_eof then fails quietly on the dead connection
        self.node.served += 1
        return resp

    async def _background(
        self, stored: Stored, n: int, usage: dict[str, Any], fault: Fault
    ) -> None:
        """A background response's generation: no client waits on it, so no batch slot."""
        node, response = self.node, stored.response
        response["status"] = "in_progress"
        if fault.mode == "hang":
            epoch = node._fault_epoch
            while node._fault_epoch == epoch:
                await asyncio.sleep(0.05)
                if response["status"] != "in_progress":  # cancelled (the task too, by now)
                    return
        slow = fault.mode == "slow"
        factor = fault.factor if slow else 1.0
        seconds = (node._prefill + n * node._dt) * factor + (fault.delay_s if slow else 0.0)
        if seconds > 0:
            await asyncio.sleep(seconds)
        if fault.mode == "die_mid_stream":
            response["status"] = "failed"
            message = "The simulated node did not complete the answer."
            response["error"] = {"code": "server_error", "message": message}
            return
        self._complete(response, n, usage, new_id("msg_"))
        node.served += 1

    # --- a stored response ---------------------------------------------------------------
    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            return json_answer(self._stored(request)[1].response)

        return await answer_of(self._errors, work)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            response_id, stored = self._stored(request)
            del self.store[response_id]
            if stored.task is not None:
                stored.task.cancel()
            return json_answer({"id": response_id, "object": "response", "deleted": True})

        return await answer_of(self._errors, work)

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """vLLM's and OpenAI's rule: only a background response not yet done is cancelled."""

        async def work() -> web.StreamResponse:
            _, stored = self._stored(request)
            response = stored.response
            if stored.task is None or response["status"] not in ("queued", "in_progress"):
                raise self._error(400, "Cannot cancel a synchronous response.", "response_id")
            stored.task.cancel()
            response["status"] = "cancelled"
            return json_answer(response)

        return await answer_of(self._errors, work)

    async def input_items(self, request: web.Request) -> web.StreamResponse:
        """The conversation a response answered, a page of it (``limit``, ``order``: ``desc``
        by default, ``after`` an item's id), as OpenAI lists it."""

        async def work() -> web.StreamResponse:
            _, stored = self._stored(request)
            query = request.query
            order = query.get("order", "desc")
            try:
                limit = int(query.get("limit", "20"))
            except ValueError:
                limit = 0
            if order not in ("asc", "desc") or not 1 <= limit <= 100:
                msg = "Invalid 'order' or 'limit': asc or desc, and 1 to 100."
                raise self._error(400, msg, "limit", "invalid_value")
            items = stored.items if order == "asc" else stored.items[::-1]
            begin = 0
            if (after := query.get("after")) is not None:
                ids = [item.get("id") for item in items]
                if after not in ids:
                    raise self._error(400, f"Invalid 'after': no item '{after}'.", "after")
                begin = ids.index(after) + 1
            page = items[begin : begin + limit]
            return json_answer(
                {
                    "object": "list",
                    "data": page,
                    "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None,
                    "has_more": begin + limit < len(items),
                }
            )

        return await answer_of(self._errors, work)
