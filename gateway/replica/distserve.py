"""DistServe: prefill on a Prefill node, migrate the KV cache, decode on a Decode node.

The protocol is LMDeploy's (``lmdeploy serve proxy --serving-strategy DistServe``); the state
that LMDeploy keeps in one proxy's memory lives in the shared store (:mod:`shared_state.pd`):

- every request gets a fleet-wide unique integer session id, sent to the Prefill node as
  ``session_id`` and to the Decode node as ``remote_session_id``;
- a (prefill, decode) pair is connected once for the fleet, under a per-pair lock;
- a prefill session is recorded until it is settled, renewed like a lease by its replica, and
  freed (``/distserve/free_cache``) by whoever removes its record: the replica when no
  migration happened, a sweep when the replica died, the removal of a node, ``/distserve/gc``.
  After a successful migration the Decode engine frees it itself, and the record is dropped.

When a Decode node answers with a status, fleetgate knows whether it took the session. When it
fails with no status after the request went out (a reset, a timeout, a killed process), it
cannot know: the engine may have migrated and freed the session before dying. fleetgate then
frees it anyway (a second free is a warning in the engine's log; a leak holds cache blocks
until the Prefill engine runs out of memory) and counts it in
``fleetgate_distserve_uncertain_frees_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.common.pd_cleanup import Call, ControlBody, DistServeMetrics, PDCleaner
from shared_state import Node, Outcome, Role, StateError, StoreUnavailable
from shared_state.pd import PDState

from .errors import BadRequest, GatewayError, InvalidJSON, UpstreamError, UpstreamTimeout
from .exchange import Exchange, NoNode, Settle
from .pairs import PairConnector, PairError
from .routing import Router
from .settings import LINK_TYPES, MIGRATION_PROTOCOLS, GatewaySettings
from .upstream import Upstream, UpstreamFailure, UpstreamResponse

log = logging.getLogger("fleetgate.distserve")

CONTROL_TIMEOUT_S = 5.0
# The request is re-encoded for the prefill and decode nodes, and orjson writes at most 254
# levels; a deeper request is refused up front rather than failing there.
MAX_DEPTH = 128
DUMMY_ENGINE = "dummy:dummy"


def control_call(upstream: Upstream) -> Call:
    """The gateway's way to reach a node's /distserve endpoints."""

    async def call(node: Node, path: str, body: ControlBody) -> tuple[int, bytes]:
        if body is None:
            return await upstream.control(node, "GET", path, timeout_s=CONTROL_TIMEOUT_S)
        payload = orjson.dumps(body)
        return await upstream.control(node, "POST", path, payload, timeout_s=CONTROL_TIMEOUT_S)

    return call


class _Retry(Exception):
    """This attempt failed before the client got anything: try again if allowed."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class _Prefilled:
    node: Node
    session_id: int
    block_ids: list[int]
    token_id: int
    sent: bool = False  # its decode request went out: the decode node may have taken it


def _request_object(body: bytes) -> dict[str, Any]:
    # orjson is stricter than the decoder that let the body in (no infinities, no lone
    # surrogates): what it refuses is the client's error, never a 500.
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest("the request body must be a JSON object")
    if _too_deep(request, MAX_DEPTH):
        raise InvalidJSON(f"request body is nested deeper than {MAX_DEPTH} levels")
    n = request.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n > 1):
        raise BadRequest("n > 1 is not supported with the DistServe serving strategy", param="n")
    return request


def _too_deep(value: object, limit: int) -> bool:
    """Whether ``value`` nests containers more than ``limit`` levels deep."""
    level: list[object] = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def _prefill_answer(data: bytes) -> tuple[list[int], int] | None:
    """(cache block ids, last remote token id) from a prefill answer; None if it lacks them."""
    try:
        answer = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(answer, dict):
        return None
    blocks = answer.get("cache_block_ids")
    tokens = answer.get("remote_token_ids") or [0]
    if not isinstance(blocks, list) or not all(isinstance(b, int) for b in blocks):
        return None
    if not isinstance(tokens, list) or not isinstance(tokens[-1], int):
        return None
    return blocks, tokens[-1]


class DistServe:
    """The DistServe request path of one replica, and the upkeep of its prefill sessions."""

    def __init__(self, settings: GatewaySettings, router: Router, upstream: Upstream) -> None:
        self.router = router
        self.upstream = upstream
        self.pd = PDState(router.store)
        self.protocol = MIGRATION_PROTOCOLS[settings.migration_protocol]
        self.dummy = settings.dummy_prefill
        self.metrics = DistServeMetrics()
        call = control_call(upstream)
        self.cleaner = PDCleaner(self.pd, call, self.metrics)
        self.connector = PairConnector(
            self.pd, call, self.protocol, LINK_TYPES[settings.link_type], self.metrics
        )
        self.owned: set[int] = set()  # open sessions of this replica, renewed like leases
        self._upkeep: asyncio.Task[None] | None = None

    # -- upkeep ---------------------------------------------------------------------------

    def start(self) -> None:
        self._upkeep = asyncio.get_running_loop().create_task(self._keep())

    async def _keep(self) -> None:
        """Renew this replica's sessions; free those of replicas that died."""
        interval = self.router.store.settings.lease_ms / 1000 / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.pd.renew(list(self.owned))
                await self.cleaner.sweep()
            except StoreUnavailable:
                self.router.metrics.store_errors.inc((("op", "pd_renew"),))
            except Exception:
                log.exception("prefill session upkeep failed")

    async def stop(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        with contextlib.suppress(StateError):
            await self.cleaner.free(await self.pd.close(*self.owned), "freed")
        self.owned.clear()

    async def _settle(self, session_id: int, *, free: bool, uncertain: bool = False) -> None:
        """End a session this replica owns: free it unless the decode engine took it."""
        self.owned.discard(session_id)
        try:
            closed = await self.pd.close(session_id)
        except StateError as exc:
            # The answer goes on; the record, no longer renewed, expires and a sweep frees it.
            log.warning("session %d left to expire: %s", session_id, exc)
            self.router.metrics.store_errors.inc((("op", "pd_close"),))
            return
        if not free:
            self.metrics.sessions.inc((("end", "migrated"),), len(closed))
            return
        if uncertain and closed:
            self.metrics.uncertain_frees.inc()
        await self.cleaner.free(closed, "freed")

    # -- the request path -----------------------------------------------------------------

    async def serve(self, exchange: Exchange, body: bytes) -> None:
        """Serve one request: each attempt prefills on a Prefill node (unless the prefill is
        a dummy) and decodes on a Decode node, through ``exchange``'s retry loop."""
        request = _request_object(body)
        tried_p: list[str] = []
        tried_d: list[str] = []

        async def one(attempt: int) -> GatewayError | None:
            prefilled: _Prefilled | None = None
            try:
                if not self.dummy:
                    prefilled = await self._prefill(exchange, request, attempt, tried_p)
                    if prefilled is None:
                        return None  # the prefill node refused the request itself: relayed
                return await self._decode(exchange, request, attempt, prefilled, tried_d)
            except _Retry as retry:
                return retry.error
            finally:
                if prefilled is not None and prefilled.session_id in self.owned:
                    # Cancelled (the client left), or failed before the decode node answered.
                    await asyncio.shield(
                        self._settle(prefilled.session_id, free=True, uncertain=prefilled.sent)
                    )

        await exchange.retry(one)

    async def _prefill(
        self, exchange: Exchange, request: dict[str, Any], attempt: int, tried: list[str]
    ) -> _Prefilled | None:
        request_id, model = exchange.request_id, exchange.model
        name = f"{exchange.lease_name}.{attempt}.p"
        route = await self.router.pick(model, name, tried, role=Role.PREFILL, claim=exchange.claim)
        if route is None:
            raise NoNode("Prefill")
        node = route.node
        started = time.perf_counter()
        outcome = Outcome.FAIL
        response: UpstreamResponse | None = None
        session_id = 0
        try:
            session_id = await self.pd.open_session(node.id, self.router.replica)
            self.owned.add(session_id)
            body = {
                **request,
                "max_tokens": 1,
                "max_completion_tokens": 1,  # both: an engine may prefer either
                "stream": False,
                "with_cache": True,
                "preserve_cache": True,
                "session_id": session_id,
            }
            body.pop("stream_options", None)
            try:
                response = await self.upstream.send(
                    node,
                    "POST",
                    exchange.scope["path"],
                    exchange.scope["headers"],
                    orjson.dumps(body),
                    request_id,
                )
                data = await response.read()
            except UpstreamFailure as exc:
                if exc.sent:
                    # The node may have kept the cache: stop renewing, and the expired record
                    # is freed by a sweep once the node has surely finished.
                    self.owned.discard(session_id)
                else:
                    await self._settle(session_id, free=False)
                error = UpstreamTimeout if exc.timeout else UpstreamError
                raise _Retry(error(f"prefill node {node.id} failed: {exc}")) from None
            status = response.status
            exchange.forwarder.metrics.attempts.inc(
                (("node", node.id), ("result", f"prefill {status}"))
            )
            if status != 200:
                await self._settle(session_id, free=False)  # a refused request holds nothing
                if 400 <= status < 500 and status != 429:
                    outcome = Outcome.NEUTRAL
                    exchange.attempts, exchange.route = attempt, route
                    await exchange.send_buffered(response, data, route)
                    return None
                outcome = Outcome.NEUTRAL if status == 429 else Outcome.FAIL
                raise _Retry(UpstreamError(f"prefill node {node.id} answered {status}"))
            parsed = _prefill_answer(data)
            if parsed is None:
                await self._settle(session_id, free=True)
                raise _Retry(UpstreamError(f"prefill node {node.id} answered no cache_block_ids"))
            outcome = Outcome.OK
            return _Prefilled(node, session_id, parsed[0], parsed[1])
        except asyncio.CancelledError:
            self.owned.discard(session_id)  # the client left mid-prefill: a sweep frees it
            raise
        finally:
            if outcome is not Outcome.OK:
                tried.append(node.id)  # a retry prefills elsewhere; a good node stays eligible
            if response is not None:
                response.close()
            elapsed = time.perf_counter() - started
            await asyncio.shield(self.router.release(route, outcome, elapsed))

    async def _decode(
        self,
        exchange: Exchange,
        request: dict[str, Any],
        attempt: int,
        prefilled: _Prefilled | None,
        tried: list[str],
    ) -> GatewayError | None:
        name = f"{exchange.lease_name}.{attempt}.d"
        route = await self.router.pick(
            exchange.model, name, tried, role=Role.DECODE, claim=exchange.claim
        )
        if route is None:
            raise NoNode("Decode")  # serve() frees the session
        node = route.node
        tried.append(node.id)
        if prefilled is None:
            migration = {
                "protocol": self.protocol,
                "remote_engine_id": DUMMY_ENGINE,
                "remote_session_id": 0,
                "remote_block_ids": [],
                "remote_token_id": 0,
                "is_dummy_prefill": True,
            }
        else:
            sid = prefilled.session_id
            try:
                connected = await self.pd.shelve(sid, node.id)
                if connected is None:
                    self.owned.discard(sid)  # taken by a node removal, which freed it
                    raise _Retry(
                        UpstreamError(f"the prefill session on {prefilled.node.id} was reclaimed")
                    )
                if not connected:
                    await self.connector.ensure(prefilled.node, node)
            except PairError as exc:
                await asyncio.shield(self.router.release(route, Outcome.FAIL, 0.0))
                raise _Retry(UpstreamError(str(exc))) from None  # serve() frees the session
            except BaseException:
                await asyncio.shield(self.router.release(route, Outcome.NEUTRAL, 0.0))
                raise
            migration = {
                "protocol": self.protocol,
                "remote_engine_id": prefilled.node.url,
                "remote_session_id": sid,
                "remote_block_ids": prefilled.block_ids,
                "remote_token_id": prefilled.token_id,
                "is_dummy_prefill": False,
            }
        body = orjson.dumps({**request, "migration_request": migration})
        settle: Settle | None = None
        if prefilled is not None:
            session = prefilled

            async def settle(status: int | None, sent: bool) -> None:
                """The decode node answered ``status`` (None: failed, maybe after sending)."""
                took = status is not None and status < 400
                uncertain = status is None and sent
                await asyncio.shield(
                    self._settle(session.session_id, free=not took, uncertain=uncertain)
                )

            session.sent = True
        return await exchange.attempt(route, attempt, body, settle)
