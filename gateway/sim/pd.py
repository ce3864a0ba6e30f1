"""The prefill/decode side of the simulated node (``fleetgate sim-node --role Prefill|Decode``).

It keeps LMDeploy's DistServe protocol (``/distserve/*`` and the ``with_cache``,
``preserve_cache``, ``session_id`` and ``migration_request`` fields) strictly enough to catch a
gateway's mistakes, and counts them:

- a Prefill node allocates a session with cache blocks for a ``with_cache`` + ``preserve_cache``
  request and holds it until it is freed, by ``/distserve/free_cache`` or by a Decode node after
  a migration; it counts double frees, frees of unknown ids, an occupied ``session_id``, and
  prefill requests that ask for more than one token;
- a Decode node refuses a migration from a prefill engine it is not connected to, or of an
  unknown or freed session, and after a successful migration frees the prefill session, as
  LMDeploy's engine does (there over ZMQ, here with one HTTP call that reads and frees);
- both count initialisations, connects, double connects and drops.

The figures are in ``/metrics`` (``sim_pd_*``) and ``/sim/stats`` (``pd``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

ROLES: Final = ("Hybrid", "Prefill", "Decode")
PROTOCOLS: Final = {1: "TCP", 2: "RDMA", 3: "NVLINK"}  # LMDeploy's MigrationProtocol values
SUCCESS: Final = 1  # DistServeConnectionStatus.SUCCESS


class PDError(Exception):
    """A refusal, answered as an OpenAI-shaped error with this status."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _int(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PDError(422, f"{name} must be an integer, not {value!r}", "invalid_field")
    return value


def _str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise PDError(422, f"{name} must be a non-empty string, not {value!r}", "invalid_field")
    return value


def _protocol(body: dict[str, Any]) -> int:
    value = _int(body, "protocol")
    if value not in PROTOCOLS:
        raise PDError(422, f"protocol must be one of {sorted(PROTOCOLS)}", "invalid_field")
    return value


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise PDError(400, f"invalid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise PDError(400, "the body must be a JSON object", "invalid_json")
    return body


Handler = Callable[["PDEngine", web.Request], Awaitable[web.Response]]


def _answers(handler: Handler) -> Handler:
    """A /distserve endpoint: a :class:`PDError` it raises is its answer."""

    @functools.wraps(handler)
    async def answer(engine: PDEngine, request: web.Request) -> web.Response:
        try:
            return await handler(engine, request)
        except PDError as exc:
            return refusal(exc)

    return answer


class PDEngine:
    """The DistServe state of one simulated Prefill or Decode engine."""

    def __init__(self, role: str, tp: int, block_size: int) -> None:
        self.role = role
        self.tp = tp
        self.block_size = block_size
        # remote engine id -> (this engine's id as the remote knows it, protocol)
        self.initialized: dict[str, tuple[str, int]] = {}
        self.connected: set[str] = set()
        self.sessions: dict[int, list[int]] = {}  # prefill: session id -> cache block ids
        self.freed: set[int] = set()
        self._auto_ids = itertools.count(1 << 40)  # session_id -1: the engine picks one
        self._blocks = itertools.count()
        self._client: aiohttp.ClientSession | None = None
        self.last_init: dict[str, Any] = {}  # protocol and RDMA link type of the last init
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "initializes",
                "connects",
                "double_connects",
                "drops",
                "allocated",
                "freed_by_decode",
                "freed_by_proxy",
                "double_frees",
                "unknown_frees",
                "occupied",
                "prefill_overruns",
                "migrations",
                "refused_migrations",
                "dummy_prefill",
            ),
            0,
        )

    # --- DistServe endpoints -------------------------------------------------------------
    async def engine_info(self, request: web.Request) -> web.Response:
        config = {
            "tp_size": self.tp,
            "dp_size": 1,
            "pp_size": None,
            "ep_size": 1,
            "dp_rank": 0,
            "block_size": self.block_size,
            "num_cpu_blocks": 0,
            "num_gpu_blocks": 4096,
        }
        # LMDeploy's endpoint returns model_dump_json(): a JSON string holding the JSON.
        return json_answer(orjson.dumps(config).decode())

    @_answers
    async def p2p_initialize(self, request: web.Request) -> web.Response:
        body = await _body(request)
        local, remote = _str(body, "local_engine_id"), _str(body, "remote_engine_id")
        protocol = _protocol(body)
        for name in ("local_engine_config", "remote_engine_config"):
            if not isinstance(body.get(name), dict) or "tp_size" not in body[name]:
                raise PDError(422, f"{name} must be an engine config", "invalid_field")
        if remote in self.initialized:
            self.counts["double_connects"] += 1  # the pair is being connected a second time
        self.initialized[remote] = (local, protocol)
        rdma = body.get("rdma_config")
        self.last_init = {
            "protocol": protocol,
            "link_type": rdma.get("link_type") if isinstance(rdma, dict) else None,
        }
        self.connected.discard(remote)  # new sockets: the old connection is gone
        self.counts["initializes"] += 1
        host = request.host
        info = orjson.dumps({"engine": local, "peer": remote}).decode()
        return json_answer(
            {
                "status": SUCCESS,
                "engine_endpoint_info": {"zmq_address": f"tcp://{host}"},
                "kvtransfer_endpoint_info": [{"protocol": protocol, "endpoint_info": info}],
            }
        )

    @_answers
    async def p2p_connect(self, request: web.Request) -> web.Response:
        body = await _body(request)
        remote = _str(body, "remote_engine_id")
        _protocol(body)
        endpoint = body.get("remote_engine_endpoint_info")
        if not isinstance(endpoint, dict) or not isinstance(endpoint.get("zmq_address"), str):
            raise PDError(422, "remote_engine_endpoint_info needs a zmq_address", "invalid")
        if not isinstance(body.get("remote_kvtransfer_endpoint_info"), list):
            raise PDError(422, "remote_kvtransfer_endpoint_info must be a list", "invalid")
        if remote not in self.initialized:
            # LMDeploy: a KeyError on the receiver socket, a 500.
            raise PDError(500, f"p2p_connect before p2p_initialize for {remote}", "no_init")
        if remote in self.connected:
            self.counts["double_connects"] += 1
        self.connected.add(remote)
        self.counts["connects"] += 1
        return json_answer({"status": SUCCESS})

    @_answers
    async def p2p_drop_connect(self, request: web.Request) -> web.Response:
        body = await _body(request)
        _str(body, "engine_id")
        remote = _str(body, "remote_engine_id")
        self.connected.discard(remote)
        self.initialized.pop(remote, None)
        self.counts["drops"] += 1
        return json_answer({"success": True})

    @_answers
    async def free_cache(self, request: web.Request) -> web.Response:
        body = await _body(request)
        _str(body, "remote_engine_id")
        sid = _int(body, "remote_session_id")
        self._free(sid, "freed_by_proxy")
        return json_answer({"status": "SUCCESS"})

    @_answers
    async def sim_migrate(self, request: web.Request) -> web.Response:
        """The Decode engine reads a session's blocks and frees it (RDMA read + ZMQ free)."""
        body = await _body(request)
        peer = _str(body, "engine_id")
        sid = _int(body, "session_id")
        blocks = body.get("block_ids")
        if peer not in self.connected:
            raise PDError(409, f"no connection with {peer}", "not_connected")
        if sid not in self.sessions:
            what = "freed" if sid in self.freed else "unknown"
            raise PDError(409, f"session {sid} is {what}", f"{what}_session")
        if blocks != self.sessions[sid]:
            raise PDError(409, f"block ids of session {sid} do not match", "bad_blocks")
        self._free(sid, "freed_by_decode")
        return json_answer({"status": "SUCCESS"})

    def _free(self, sid: int, by: str) -> None:
        if sid in self.sessions:
            del self.sessions[sid]
            self.freed.add(sid)
            self.counts[by] += 1
        elif sid in self.freed:
            self.counts["double_frees"] += 1
        else:
            self.counts["unknown_frees"] += 1

    # --- generation ----------------------------------------------------------------------
    def wants_prefill(self, body: dict[str, Any]) -> bool:
        return self.role == "Prefill" and body.get("with_cache") is True

    async def prefill(self, body: dict[str, Any], n: int, work: Any) -> dict[str, Any]:
        """Run one prefill (``work`` is the generation coroutine factory, returning the answer)
        and keep its cache when ``preserve_cache`` asks for it."""
        sid = body.get("session_id", -1)
        if sid is None:
            sid = -1
        if not isinstance(sid, int) or isinstance(sid, bool):
            raise PDError(422, f"session_id must be an integer, not {sid!r}", "invalid_field")
        if sid in self.sessions:
            self.counts["occupied"] += 1
            raise PDError(400, f"The session_id {sid!r} is occupied.", "session_occupied")
        if n != 1:
            self.counts["prefill_overruns"] += 1
        if sid < 0:
            sid = next(self._auto_ids)
        answer: dict[str, Any] = await work()
        prompt = answer.get("usage", {}).get("prompt_tokens", 0)
        blocks = [next(self._blocks) for _ in range(max(1, math.ceil(prompt / self.block_size)))]
        if body.get("preserve_cache") is True:
            self.sessions[sid] = blocks
            self.freed.discard(sid)
            self.counts["allocated"] += 1
        if answer.get("object") == "text_completion":
            answer["id"] = str(sid)  # LMDeploy answers completions with the session id
        answer["cache_block_ids"] = blocks
        answer["remote_token_ids"] = [7]
        return answer

    async def migrate(self, body: dict[str, Any]) -> None:
        """Take over a prefill session before decoding, or refuse (as the engine would)."""
        if self.role != "Decode":
            return
        request = body.get("migration_request")
        if request is None:
            return
        if not isinstance(request, dict):
            raise PDError(422, "migration_request must be an object", "invalid_field")
        protocol = _protocol(request)
        remote = _str(request, "remote_engine_id")
        sid = _int(request, "remote_session_id")
        _int(request, "remote_token_id")
        blocks = request.get("remote_block_ids")
        if not isinstance(blocks, list) or not all(isinstance(b, int) for b in blocks):
            raise PDError(422, "remote_block_ids must be a list of integers", "invalid_field")
        if request.get("is_dummy_prefill") is True:
            self.counts["dummy_prefill"] += 1
            return
        if remote not in self.connected:
            self.counts["refused_migrations"] += 1
            raise PDError(500, f"no connection with prefill engine {remote}", "not_connected")
        local, connected_protocol = self.initialized[remote]
        if protocol != connected_protocol:
            self.counts["refused_migrations"] += 1
            raise PDError(500, f"protocol {protocol} is not {connected_protocol}", "protocol")
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        url = f"{remote}/distserve/sim_migrate"
        payload = {"engine_id": local, "session_id": sid, "block_ids": blocks}
        try:
            async with self._client.post(url, json=payload) as resp:
                detail = await resp.text()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.counts["refused_migrations"] += 1
            raise PDError(500, f"migration from {remote} failed: {exc}", "migration") from None
        if status != 200:
            self.counts["refused_migrations"] += 1
            raise PDError(500, f"migration from {remote} failed: {detail}", "migration")
        self.counts["migrations"] += 1

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    # --- figures -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "held": len(self.sessions),
            "connected": sorted(self.connected),
            "last_init": self.last_init,
            **self.counts,
        }

    def metric_lines(self) -> list[str]:
        lines = [
            "# HELP sim_pd_sessions_held Prefill sessions holding cache blocks.",
            "# TYPE sim_pd_sessions_held gauge",
            f"sim_pd_sessions_held {len(self.sessions)}",
        ]
        for name, value in self.counts.items():
            metric = f"sim_pd_{name}_total"
            lines += [f"# TYPE {metric} counter", f"{metric} {value}"]
        return lines


def json_answer(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def refusal(exc: PDError) -> web.Response:
    body = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": exc.code}}
    return json_answer(body, exc.status)


def add_routes(app: web.Application, engine: PDEngine) -> None:
    app.router.add_get("/distserve/engine_info", engine.engine_info)
    app.router.add_post("/distserve/p2p_initialize", engine.p2p_initialize)
    app.router.add_post("/distserve/p2p_connect", engine.p2p_connect)
    app.router.add_post("/distserve/p2p_drop_connect", engine.p2p_drop_connect)
    app.router.add_post("/distserve/free_cache", engine.free_cache)
    app.router.add_post("/distserve/sim_migrate", engine.sim_migrate)
