"""Simulated OpenAI-compatible LLM inference node.

It stands in for vLLM-like backends in tests, benchmarks and the demo: a fixed pool of batch
slots with a waiting queue, deterministic output ("tok0 tok1 ..."), vLLM-style Prometheus
gauges, and faults that can be switched on at start-up (``--fault``) or at runtime
(``POST /sim/fault``) to exercise the gateway's failure handling. With ``--tokens-per-s 0``
(or ``inf``) and no prefill it never sleeps, so it can serve as the "direct to backend"
baseline in benchmarks. ``--flavor vllm`` or ``--flavor llamacpp`` makes it answer as vLLM or
llama.cpp's ``llama-server`` does where that differs (``flavors``), and ``--loading-s`` gives it
a model-loading phase.

Run it with ``python -m gateway.sim.node --port 0``; it prints one line
``fleetgate-sim listening on http://HOST:PORT name=NAME models=M1,M2 slots=N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import math
import signal
import ssl
import sys
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from . import apis, flavors
from .answers import (
    ApiError,
    completion_body,
    embeddings_body,
    error_response,
    prompt_words,
    sse,
    usage,
)
from .faults import FAULT_MODES, STATUS_FAULTS, ClientGone, Fault, abort
from .kvcache import Prefilled, PrefixEngine, answer_tokens, request_tokens
from .metrics import page, vllm_lines
from .pd import ROLES, PDEngine, PDError, add_routes, json_answer, refusal

# How often blocked requests look for a client disconnect: aiohttp does not cancel handlers
# when the peer goes away (handler_cancellation is off by default), so we must notice ourselves.
_POLL_S: Final = 0.05
# Shorter waits are folded into the next one: a timer wake-up per token would dominate the CPU
# cost at high token rates, and clients cannot tell a few milliseconds apart anyway.
_MIN_SLEEP_S: Final = 0.005
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE: Final = b"data: [DONE]\n\n"
CACHED: Final = web.RequestKey("fleetgate_sim_cached", int)  # prompt words the cache held
SEQ: Final = web.RequestKey("fleetgate_sim_seq", Prefilled)  # the request in the KV cache


@dataclass(frozen=True, slots=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 8001
    models: tuple[str, ...] = ("sim-model",)
    slots: int = 8
    tokens_per_s: float = 50.0  # 0 or inf: instant decode
    prefill_ms: float = 0.0
    max_queue: int = 256
    api_key: str | None = None
    fault: str = "none"
    name: str | None = None  # None: "host:port" of the bound socket
    certfile: str | None = None  # with keyfile: serve HTTPS
    keyfile: str | None = None
    role: str = "Hybrid"  # Prefill or Decode: LMDeploy's DistServe engine roles
    tp: int = 1  # tensor-parallel size reported by /distserve/engine_info
    block_size: int = 64  # prompt tokens per cache block of a prefill session
    flavor: str = "sim"  # or "vllm", "llamacpp": the engine whose HTTP it imitates (flavors.py)
    loading_s: float = 0.0  # loads this long after start, as its flavor shows it
    cache_blocks: int = 0  # prefix cache (kvcache.py) of this many blocks; 0: none
    block_tokens: int = 16  # prompt tokens per prefix-cache block
    prefill_tokens_per_s: float = 0.0  # uncached prompt tokens prefilled per s; 0 or inf: free

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one model is required")
        if self.slots < 1 or self.max_queue < 0 or self.prefill_ms < 0 or self.tokens_per_s < 0:
            raise ValueError("slots must be >= 1; max_queue, prefill_ms, tokens_per_s >= 0")
        if self.fault not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {self.fault!r}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if self.tp < 1 or self.block_size < 1:
            raise ValueError("tp and block_size must be >= 1")
        if self.flavor not in flavors.FLAVORS or not self.loading_s >= 0:
            raise ValueError(f"flavor must be one of {', '.join(flavors.FLAVORS)}; loading_s >= 0")
        if self.cache_blocks < 0 or self.block_tokens < 1 or not self.prefill_tokens_per_s >= 0:
            raise ValueError("cache_blocks, prefill_tokens_per_s must be >= 0; block_tokens >= 1")

    @property
    def cache_capacity(self) -> int:
        """The prefix cache's blocks: ``cache_blocks``, else what its flavor has by default."""
        return self.cache_blocks or flavors.of(self.flavor).cache_blocks(
            self.slots, self.block_tokens
        )

    @property
    def kv_engine(self) -> bool:
        """Whether a Hybrid node models its KV cache and prefill (kvcache.py)."""
        rate = self.prefill_tokens_per_s
        return self.role == "Hybrid" and (self.cache_capacity > 0 or 0 < rate < math.inf)


class SimNode:
    """State and handlers of one simulated node; ``app[NODE_KEY]`` gives it to tests."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.name = config.name
        self.stop = asyncio.Event()  # set by SIGINT/SIGTERM or POST /terminate
        tps = config.tokens_per_s
        self._dt = 0.0 if tps == 0 or math.isinf(tps) else 1.0 / tps
        self._prefill = config.prefill_ms / 1000.0
        self._free = config.slots
        self._queue: deque[asyncio.Future[None]] = deque()
        self.running = dict.fromkeys(config.models, 0)
        self.waiting = dict.fromkeys(config.models, 0)
        self._n_running = self._n_waiting = 0
        self.served = self.requests_total = self.peak = 0  # peak: most held at once, since reset
        self._ends: list[float] = []  # when each slot free now was freed (wall s), last last
        self._gaps: deque[tuple[float, float, int]] = deque(maxlen=20_000)  # see _acquire
        self.fault = Fault(config.fault)
        self._fault_epoch = 0  # bumped by explicit changes only, which is what releases "hang"
        self._closing = False
        self._conns: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self._created = int(time.time())
        self._ids = itertools.count()
        self._auth = f"Bearer {config.api_key}".encode() if config.api_key else None
        self.flavor = flavors.of(config.flavor)
        self.llamacpp = config.flavor == "llamacpp"
        self.loaded_at = time.monotonic() + config.loading_s
        self.prefix = flavors.PrefixCache()
        self.kv: PrefixEngine | None = None
        if config.kv_engine:
            size, rate = config.block_tokens, config.prefill_tokens_per_s
            self.kv = PrefixEngine(config.cache_capacity, size, rate, config.models)
        self.pd = (
            PDEngine(config.role, config.tp, config.block_size) if config.role != "Hybrid" else None
        )

    # --- state -------------------------------------------------------------------------
    def set_fault(
        self,
        mode: str,
        count: int | None = None,
        delay_s: float | None = None,
        factor: float | None = None,
        after_tokens: int | None = None,
    ) -> None:
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}")
        if count is not None and count < 1:
            raise ValueError("count must be >= 1")
        fault = Fault(mode, count)
        fault.delay_s = fault.delay_s if delay_s is None else delay_s
        fault.factor = fault.factor if factor is None else factor
        fault.after_tokens = fault.after_tokens if after_tokens is None else after_tokens
        self.fault = fault
        self._fault_epoch += 1

    def reset(self) -> None:
        self.set_fault("none")
        self.served = self.requests_total = self.peak = 0
        self._ends, self._gaps = [], deque(maxlen=self._gaps.maxlen)

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "running": self._n_running,
            "waiting": self._n_waiting,
            "peak": self.peak,
            "idle_gaps": [[round(t, 3), round((t - end) * 1000, 3), n] for t, end, n in self._gaps],
            "served": self.served,
            "active_connections": sum(1 for t in self._conns if not t.is_closing()),
            "fault": self.fault.mode,
            "fault_remaining": self.fault.remaining,
            "requests_total": self.requests_total,
            "slots": self.config.slots,
            **({"pd": self.pd.stats()} if self.pd is not None else {}),
            **({"kv": self.kv.stats()} if self.kv is not None else {}),
        }

    def _consume(self, fault: Fault) -> None:
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0 and self.fault is fault:
                self.fault = Fault()

    def _gone(self, request: web.Request) -> bool:
        transport = request.transport
        return self._closing or transport is None or transport.is_closing()

    async def _sleep(self, request: web.Request, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            await asyncio.sleep(min(left, _POLL_S))
            if self._gone(request):
                raise ClientGone

    async def _acquire(self, request: web.Request, model: str) -> None:
        self.peak = max(self.peak, self._n_running + self._n_waiting + 1)
        if self._free > 0 and not self._queue:
            if self._ends:  # the slot freed last taken again: (arrival, its end, requests running)
                self._gaps.append((time.time(), self._ends.pop(), self._n_running))
            self._free -= 1
            return
        if self._n_waiting >= self.config.max_queue:
            raise ApiError(
                self.flavor.error(503, "queue is full", "server_error", None, "queue_full")
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(fut)
        self.waiting[model] += 1
        self._n_waiting += 1
        try:
            while not fut.done():
                await asyncio.wait((fut,), timeout=_POLL_S)
                if not fut.done() and self._gone(request):
                    raise ClientGone
        except BaseException:
            if not fut.done():
                fut.cancel()
                self._queue.remove(fut)
            elif not fut.cancelled():
                self._release()  # the slot was handed over just as we gave up
            raise
        finally:
            self.waiting[model] -= 1
            self._n_waiting -= 1

    def _release(self) -> None:
        self._ends.append(time.time())  # the slot stands idle from now until taken (_acquire)
        while self._queue:
            fut = self._queue.popleft()
            if not fut.done():
                fut.set_result(None)  # taken at once by a request waiting here: idle for no time
                self._gaps.append((self._ends[-1], self._ends.pop(), self._n_running))
                return
        self._free += 1

    # --- HTTP ----------------------------------------------------------------------------
    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        transport = request.transport
        if transport is not None:
            self._conns.add(transport)
            if self.name is None and isinstance(
                addr := transport.get_extra_info("sockname"), tuple
            ):
                host, port = addr[:2]
                self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        response.headers["x-sim-node"] = self.name or ""
        if (seq := request.get(SEQ)) is not None:  # the engine's own figure, for tests
            response.headers["x-sim-prefill-ms"] = f"{seq.prefill_s * 1000:.3f}"

    async def _on_shutdown(self, app: web.Application) -> None:
        self._closing = True  # lets hung and sleeping handlers return before shutdown times out
        if self.pd is not None:
            await self.pd.close()

    def _check_auth(self, request: web.Request) -> None:
        if self._auth is not None:
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, self._auth):
                msg = "Incorrect API key provided."
                raise ApiError(self.flavor.error(401, msg, code="invalid_api_key"))

    async def _read(self, request: web.Request) -> tuple[dict[str, Any], str]:
        self._check_auth(request)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise ApiError(self.flavor.error(400, f"Invalid JSON body: {exc}")) from None
        if not isinstance(body, dict):
            raise ApiError(self.flavor.error(400, "The request body must be a JSON object."))
        return body, self.flavor.model_of(body, self.running)

    async def models(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
        except ApiError as exc:
            return exc.response
        return json_answer(self.flavor.models_body(self.config.models, self._created))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "text")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "embed")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        self.requests_total += 1
        try:
            body, model = await self._read(request)
            if self.llamacpp and self.kv is None:  # the one-slot cache meets it as it arrives
                prompt = body.get("messages") if kind == "chat" else body.get("prompt")
                request[CACHED] = self.prefix.hit(prompt_words(prompt))
            n = 0 if kind == "embed" else self.flavor.max_tokens(kind, body)
            fault = self.fault
            if fault.mode in ("none", "unhealthy"):
                fault = Fault()
            else:
                self._consume(fault)
            mode = fault.mode
            if (spec := STATUS_FAULTS.get(mode)) is not None:
                msg = f"simulated fault: {mode}"
                return self.flavor.error(spec[0], msg, spec[1], None, spec[2])
            if mode == "reset":
                abort(request, rst=True)
                raise ClientGone
            pd = self.pd
            await self._acquire(request, model)
            self.running[model] += 1
            self._n_running += 1
            try:
                if pd is not None and pd.wants_prefill(body):
                    return await self._pd_prefill(request, kind, body, model, n, pd)
                return await self._produce(request, kind, body, model, n, fault)
            finally:
                if self.kv is not None and (seq := request.get(SEQ)) is not None:
                    self.kv.finish(seq, None)  # unless _served cached its answer already
                self.running[model] -= 1
                self._n_running -= 1
                self._release()
        except ApiError as exc:
            return exc.response
        except PDError as exc:
            return refusal(exc)
        except ClientGone:
            # Usually unwritable; a client still there only sees it when the server shuts down.
            return self.flavor.error(503, "the node is shutting down", "server_error")

    async def _produce(
        self,
        request: web.Request,
        kind: str,
        body: dict[str, Any],
        model: str,
        n: int,
        fault: Fault,
    ) -> web.StreamResponse:
        if fault.mode == "hang":
            epoch = self._fault_epoch
            while self._fault_epoch == epoch:
                await asyncio.sleep(_POLL_S)
                if self._gone(request):
                    raise ClientGone
        streamed = body.get("stream") is True and kind != "embed"
        if self.pd is not None and not streamed:
            # Scheduled: the engine migrates the prefill session now, then decodes.
            await self.pd.migrate(body)
        slow = fault.mode == "slow"
        factor = fault.factor if slow else 1.0
        dt = self._dt * factor
        prefill = self._prefill * factor + (fault.delay_s if slow else 0.0)
        if prefill > 0:
            await self._sleep(request, prefill)
        if self.kv is not None and kind != "embed":
            await self._kv_prefill(request, self.kv, kind, body, model, n, factor)
        cut = fault.after_tokens if fault.mode == "die_mid_stream" else None
        if kind == "embed":
            result = embeddings_body(body, model)
        elif body.get("stream") is True:
            return await self._stream(request, kind, body, model, n, dt, cut)
        else:
            if n and dt:
                await self._sleep(request, n * dt)
            usage_ = self._usage(request, kind, body, n, streamed=False)
            result = self.flavor.answer(
                kind, completion_body(kind, body, model, n, next(self._ids), usage_)
            )
        if cut is not None:
            abort(request, rst=False)
            raise ClientGone
        self._served(request, kind, body, n)
        return json_answer(result)

    async def _kv_prefill(
        self,
        request: web.Request,
        kv: PrefixEngine,
        kind: str,
        body: Any,
        model: str,
        n: int,
        factor: float,
    ) -> None:
        """The prefill of the uncached prompt, in turn with the engine's other prefills."""

        async def sleep(seconds: float) -> None:
            if self._gone(request):  # it waited for its turn: no prefill for a client gone
                raise ClientGone
            await self._sleep(request, seconds)

        seq = await kv.prefill(model, request_tokens(kind, body), n, sleep, factor)
        request[SEQ] = seq
        request[CACHED] = seq.cached

    def _served(self, request: web.Request, kind: str, body: dict[str, Any], n: int) -> None:
        """Count an answer sent whole; the engine caches its tokens for the next turn."""
        self.served += 1
        if self.kv is not None and (seq := request.get(SEQ)) is not None:
            text = " ".join(f"tok{i}" for i in range(n))
            self.kv.finish(seq, answer_tokens(kind, body, text))

    async def _pd_prefill(
        self,
        request: web.Request,
        kind: str,
        body: dict[str, Any],
        model: str,
        n: int,
        pd: PDEngine,
    ) -> web.StreamResponse:
        """A DistServe prefill: always one JSON answer, with the cache kept for migration."""

        async def work() -> dict[str, Any]:
            seconds = self._prefill + n * self._dt
            if seconds > 0:
                await self._sleep(request, seconds)
            return completion_body(kind, body, model, n, next(self._ids))

        answer = await pd.prefill(body, n, work)
        self.served += 1
        return json_answer(answer)

    async def _stream(
        self,
        request: web.Request,
        kind: str,
        body: dict[str, Any],
        model: str,
        n: int,
        dt: float,
        cut: int | None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        chat = kind == "chat"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-sim{next(self._ids)}"
        head = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        loop = asyncio.get_running_loop()
        try:
            await resp.prepare(request)
            if self.pd is not None:
                # As LMDeploy's api_server, the stream's 200 goes out before the engine runs:
                # the migration happens after it, and a refusal is an error event.
                try:
                    await self.pd.migrate(body)
                except PDError as exc:
                    error = {"message": str(exc), "type": "server_error", "code": exc.code}
                    await resp.write(sse({"error": error}) + _DONE)
                    return resp
            t0 = loop.time()
            shape = self.flavor
            for event in shape.opening(chat, head):
                await resp.write(sse(event))
            options = body.get("stream_options")
            asked = isinstance(options, dict) and options.get("include_usage") is True
            for i in range(n if cut is None else min(n, cut)):
                if dt and (wait := t0 + (i + 1) * dt - loop.time()) >= _MIN_SLEEP_S:
                    await self._sleep(request, wait)
                # One write per token, as model servers flush each token as it is decoded.
                await resp.write(sse(shape.token(chat, head, i, f"tok{i} ", i == n - 1, asked)))
            if cut is not None:
                abort(request, rst=False)
                return resp
            closing = shape.closing(
                chat, head, lambda: self._usage(request, kind, body, n, streamed=True), asked
            )
            await resp.write(b"".join([*map(sse, closing), _DONE]))
        except (ConnectionError, ClientGone):
            return resp  # aiohttp's write_eof then fails quietly on the dead connection
        self._served(request, kind, body, n)
        return resp

    def _usage(
        self, request: web.Request, kind: str, body: dict[str, Any], n: int, streamed: bool
    ) -> dict[str, Any]:
        """The answer's usage, with what the cache held of its prompt when there is one."""
        seq = request.get(SEQ)
        created = seq.created if seq is not None else 0
        found: dict[str, Any] = usage(kind, body, n)
        return self.flavor.usage(kind, found, request.get(CACHED), created, streamed)

    async def slots(self, request: web.Request) -> web.Response:
        return json_answer(flavors.slots_body(self.config.slots, self._n_running))

    async def health(self, request: web.Request) -> web.Response:
        fault = self.fault
        if fault.mode == "unhealthy":
            self._consume(fault)
            return json_answer({"status": "unhealthy"}, status=503)
        return self.flavor.health()

    async def metrics(self, request: web.Request) -> web.Response:
        engine, lines = self.kv, []
        if self.llamacpp:  # its own names, the cached tokens only
            if engine is None:
                cached, prefilled = self.prefix.cached_total, self.prefix.prefilled_total
            else:
                cached = engine.hits
                prefilled = sum(c.queries for c in engine.counts.values()) - cached
            lines += flavors.llamacpp_metric_lines(
                self._n_running, self._n_waiting, cached, prefilled
            )
        elif self.flavor.name == "vllm" and engine is not None:
            counts = engine.counts
            queries = {model: c.queries for model, c in counts.items()}
            hits = {model: c.hits for model, c in counts.items()}
            kv = engine.kv_usage()  # the blocks running requests take
            lines += flavors.vllm_metric_lines(self.running, self.waiting, kv, queries, hits)
        elif engine is not None and engine.cache.capacity:
            lines += vllm_lines(self.running, self.waiting, engine.kv_usage())  # blocks in use
            lines += engine.metric_lines()
        else:  # a busy slot holds its whole context
            kv = self._n_running / self.config.slots
            lines += vllm_lines(self.running, self.waiting, kv)
            lines += engine.metric_lines() if engine is not None else []
        lines += [
            "# HELP sim_requests_total Generation requests received.",
            "# TYPE sim_requests_total counter",
            f"sim_requests_total {self.requests_total}",
        ]
        if self.pd is not None:
            lines += self.pd.metric_lines()
        return page(lines)

    async def sim_fault(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            count, delay, factor, after = (
                body.get(k) for k in ("count", "delay_s", "factor", "after_tokens")
            )
            self.set_fault(
                body["mode"],
                None if count is None else int(count),
                None if delay is None else float(delay),
                None if factor is None else float(factor),
                None if after is None else int(after),
            )
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            return error_response(400, f"bad fault request: {exc!r}")
        return json_answer(self.stats())

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /reset_prefix_cache``: a cold cache, e.g. between benchmark runs."""
        assert self.kv is not None
        return json_answer({"dropped_blocks": self.kv.cache.clear()})

    async def sim_stats(self, request: web.Request) -> web.Response:
        return json_answer(self.stats())

    async def sim_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return json_answer(self.stats())

    async def terminate(self, request: web.Request) -> web.Response:
        """LMDeploy api_server's /terminate: answer, then stop the process."""
        try:
            self._check_auth(request)
        except ApiError as exc:
            return exc.response
        asyncio.get_running_loop().call_later(0.05, self.stop.set)
        return json_answer({"status": "terminating", "name": self.name})


NODE_KEY: Final = web.AppKey("fleetgate_simnode", SimNode)


def build_app(config: SimConfig) -> web.Application:
    node = SimNode(config)
    middlewares = node.flavor.middlewares(config.loading_s, node.loaded_at)
    app = web.Application(client_max_size=64 * 1024**2, middlewares=middlewares)
    app[NODE_KEY] = node
    app.on_response_prepare.append(node._on_prepare)
    app.on_shutdown.append(node._on_shutdown)
    app.router.add_get("/v1/models", node.models)
    app.router.add_post("/v1/chat/completions", node.chat)
    app.router.add_post("/v1/completions", node.completions)
    app.router.add_post("/v1/embeddings", node.embeddings)
    app.router.add_get("/health", node.health)
    app.router.add_get("/metrics", node.metrics)
    app.router.add_post("/sim/fault", node.sim_fault)
    app.router.add_get("/sim/stats", node.sim_stats)
    app.router.add_post("/sim/reset", node.sim_reset)
    app.router.add_post("/terminate", node.terminate)
    if node.llamacpp:
        app.router.add_get("/slots", node.slots)
    if node.kv is not None:
        app.router.add_post("/reset_prefix_cache", node.reset_prefix_cache)
    if node.pd is not None:
        add_routes(app, node.pd)
    return apis.add_routes(app, node)  # the Responses, Messages, rerank, audio... APIs


async def serve(config: SimConfig) -> None:
    """Serve until SIGINT, SIGTERM or POST /terminate, printing the listening line once bound."""
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = None
    if config.certfile and config.keyfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.certfile, config.keyfile)
    node = app[NODE_KEY]
    stop = node.stop
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if not node.flavor.listens_while_loading and config.loading_s > 0:
            # vLLM binds its socket only once its model is loaded: until then, refused.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), config.loading_s)
        if not stop.is_set():
            await web.TCPSite(runner, config.host, config.port, ssl_context=context).start()
            port = runner.addresses[0][1]
            host = f"[{config.host}]" if ":" in config.host else config.host
            node.name = config.name or f"{host}:{port}"
            print(
                f"fleetgate-sim listening on {'https' if context else 'http'}://{host}:{port} "
                f"name={node.name} models={','.join(config.models)} slots={config.slots}",
                flush=True,
            )
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gateway.sim.node", description="Simulated LLM node."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="repeatable (default: sim-model)",
    )
    p.add_argument("--slots", type=int, default=8, help="concurrent sequences in the batch")
    p.add_argument("--tokens-per-s", type=float, default=50.0, help="0 or inf: instant")
    p.add_argument("--prefill-ms", type=float, default=0.0)
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    p.add_argument("--api-key", default=None)
    p.add_argument("--fault", default="none", choices=sorted(FAULT_MODES))
    p.add_argument("--name", default=None, help="label in x-sim-node (default host:port)")
    p.add_argument("--certfile", default=None, help="with --keyfile: serve HTTPS")
    p.add_argument("--keyfile", default=None)
    p.add_argument("--role", default="Hybrid", choices=ROLES, help="DistServe engine role")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size it reports")
    p.add_argument("--block-size", type=int, default=64, help="prompt tokens per cache block")
    p.add_argument("--flavor", default="sim", choices=flavors.FLAVORS, help="engine imitated")
    p.add_argument("--loading-s", type=float, default=0.0, help="seconds loading (see --flavor)")
    p.add_argument("--cache-blocks", type=int, default=0, help="prefix cache in blocks; 0: none")
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per prefix-cache block")
    p.add_argument(
        "--prefill-tokens-per-s", type=float, default=0.0, help="uncached prompt; 0 or inf: free"
    )
    args = p.parse_args(argv)
    try:
        config = SimConfig(**{**vars(args), "models": tuple(args.models or ("sim-model",))})
    except ValueError as exc:
        p.error(str(exc))
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:  # a signal before the handlers were installed
        pass
    except OSError as exc:
        print(f"fleetgate-sim: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
