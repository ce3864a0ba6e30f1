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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from shared_state import Node, NodeState, Outcome, Role, StateError, StoreUnavailable
from shared_state.pd import PDSession, PDState

from .errors import (
    BadRequest,
    GatewayError,
    UpstreamError,
    UpstreamTimeout,
)
from .metrics import Counter
from .proxy import Upstream, UpstreamFailure, UpstreamResponse
from .settings import LINK_TYPES, MIGRATION_PROTOCOLS, GatewaySettings

if TYPE_CHECKING:
    from .handler import ProxyHandler, Scope, Settle, _Exchange
    from .routing import Router

log = logging.getLogger("fleetgate.distserve")

CONNECT_ATTEMPTS = 3
LOCK_MS = 60_000  # a connect that takes longer than this lets another process try
CONTROL_TIMEOUT_S = 5.0
DUMMY_ENGINE = "dummy:dummy"

# (node, path, JSON body or None for GET) -> (status, body); raises on transport failure.
Call = Callable[[Node, str, Any], Awaitable[tuple[int, bytes]]]


class PairError(Exception):
    """A prefill/decode pair could not be connected."""


class PairMismatch(PairError):
    """The pair's engines cannot be connected at all (their parallel sizes differ)."""


class DistServeMetrics:
    def __init__(self) -> None:
        self.sessions = Counter(
            "fleetgate_distserve_sessions_total",
            "Prefill sessions by how they ended: migrated (freed by the decode engine), "
            "freed (by fleetgate), expired (owner gone, freed by a sweep), dropped (node gone).",
        )
        self.uncertain_frees = Counter(
            "fleetgate_distserve_uncertain_frees_total",
            "Sessions freed after a decode node failed with no answer (it may have freed them).",
        )
        self.free_errors = Counter(
            "fleetgate_distserve_free_errors_total", "free_cache calls that failed."
        )
        self.connects = Counter(
            "fleetgate_distserve_pair_connects_total", "Pairs this process connected, by result."
        )

    def counters(self) -> tuple[Counter, ...]:
        return (self.sessions, self.uncertain_frees, self.free_errors, self.connects)


def control_call(upstream: Upstream) -> Call:
    """The gateway's way to reach a node's /distserve endpoints."""

    async def call(node: Node, path: str, body: Any) -> tuple[int, bytes]:
        if body is None:
            return await upstream.control(node, "GET", path, timeout_s=CONTROL_TIMEOUT_S)
        payload = orjson.dumps(body)
        return await upstream.control(node, "POST", path, payload, timeout_s=CONTROL_TIMEOUT_S)

    return call


def node_of(pd: PDState, node_id: str) -> Node:
    """The registered node, or a stand-in for one that left the registry (its id is its URL)."""
    view = pd.store.cached_view
    if view is not None and node_id in view.by_id:
        return view.by_id[node_id]
    return Node(id=node_id, url=node_id, models=())


def _json(body: bytes) -> Any:
    value = orjson.loads(body)
    # /distserve/engine_info answers model_dump_json(): JSON inside a JSON string.
    return orjson.loads(value) if isinstance(value, str) else value


def _succeeded(answer: Any) -> bool:
    status = answer.get("status") if isinstance(answer, dict) else None
    return status in (1, "SUCCESS", "1")


class PDCleaner:
    """Frees prefill sessions and disconnects pairs: shared by replicas and the checker."""

    def __init__(self, pd: PDState, call: Call, metrics: DistServeMetrics) -> None:
        self.pd = pd
        self.call = call
        self.metrics = metrics
        self._absent: set[str] = set()  # nodes of pairs or sessions missing at the last look

    async def free(self, sessions: list[PDSession], how: str) -> int:
        """Free sessions on their prefill nodes; returns how many calls succeeded."""
        if not sessions:
            return 0
        results = await asyncio.gather(*(self._free_one(s) for s in sessions))
        self.metrics.sessions.inc((("end", how),), len(sessions))
        return sum(results)

    async def _free_one(self, session: PDSession) -> bool:
        node = node_of(self.pd, session.prefill)
        body = {"remote_engine_id": session.prefill, "remote_session_id": session.session_id}
        try:
            status, _ = await self.call(node, "/distserve/free_cache", body)
        except Exception as exc:  # a dead node holds nothing any more
            log.warning(
                "free_cache of session %d on %s failed: %s", session.session_id, node.id, exc
            )
            self.metrics.free_errors.inc()
            return False
        if status != 200:
            log.warning(
                "free_cache of session %d on %s answered %d", session.session_id, node.id, status
            )
            self.metrics.free_errors.inc()
            return False
        return True

    async def sweep(self) -> int:
        """Free the sessions of replicas that stopped renewing them."""
        return await self.free(await self.pd.take_expired(), "expired")

    async def drop_node(self, node_id: str) -> dict[str, int]:
        """A node left: disconnect its pairs on both sides and free its sessions."""
        pairs, sessions = await self.pd.drop_node(node_id)
        freed = await self.free(sessions, "dropped")
        drops = []
        for p, d in pairs:
            for engine, remote in ((p, d), (d, p)):
                drops.append(self._drop_one(engine, remote))
        await asyncio.gather(*drops)
        if pairs or sessions:
            log.info(
                "node %s left: dropped %d pairs, freed %d of %d sessions",
                node_id,
                len(pairs),
                freed,
                len(sessions),
            )
        return {"pairs_dropped": len(pairs), "sessions": len(sessions), "freed": freed}

    async def drop_departed(self, registered: set[str]) -> list[str]:
        """Drop the pairs and sessions of nodes that left the registry by a path that does
        not clean up (``fleetgate nodes remove``, a script writing Redis).

        ``registered`` is read before the PD state: a node that registers in between can
        look departed once, so only a node missing from two calls in a row is dropped.
        """
        pairs = await self.pd.pairs()
        sessions = await self.pd.sessions()
        involved = {node for pair in pairs for node in pair}
        involved |= {s.prefill for s in sessions} | {s.decode for s in sessions if s.decode}
        absent = involved - registered
        departed = sorted(absent & self._absent)
        self._absent = absent - set(departed)
        for node_id in departed:
            await self.drop_node(node_id)
        return departed

    async def _drop_one(self, engine: str, remote: str) -> None:
        body = {"engine_id": engine, "remote_engine_id": remote}
        with contextlib.suppress(Exception):  # the node that left may well be dead
            await self.call(node_of(self.pd, engine), "/distserve/p2p_drop_connect", body)

    async def gc(self, live_replicas: set[str]) -> dict[str, int]:
        """Free sessions whose migration is over or orphaned: expired records, records whose
        nodes left the registry, records of replicas that are not alive."""
        expired = await self.pd.take_expired()
        view = await self.pd.store.refresh_latest()
        orphans = [
            s.session_id
            for s in await self.pd.sessions()
            if s.prefill not in view.by_id
            or (s.decode and s.decode not in view.by_id)
            or s.replica not in live_replicas
        ]
        orphaned = await self.pd.close(*orphans)
        freed = await self.free(expired, "expired") + await self.free(orphaned, "orphaned")
        return {
            "expired": len(expired),
            "orphaned": len(orphaned),
            "freed": freed,
            "failed": len(expired) + len(orphaned) - freed,
            "in_migration": len(await self.pd.sessions()),
        }


@dataclass(frozen=True, slots=True)
class PairResult:
    prefill: str
    decode: str
    status: str  # "connected", "already_connected", "failed"
    detail: str = ""


class PairConnector:
    """Connects (prefill, decode) pairs once for the whole fleet."""

    def __init__(
        self, pd: PDState, call: Call, protocol: int, link_type: int, metrics: DistServeMetrics
    ) -> None:
        self.pd = pd
        self.call = call
        self.protocol = protocol
        self.link_type = link_type
        self.metrics = metrics

    async def ensure(self, prefill: Node, decode: Node) -> str:
        """Return once the pair is connected: "already_connected" or "connected" (by this
        call). Raises :class:`PairError` when it cannot be connected."""
        deadline = time.monotonic() + LOCK_MS / 1000 + 5
        delay = 0.01
        while True:
            token = await self.pd.try_lock(prefill.id, decode.id, LOCK_MS)
            if token == "":
                return "already_connected"
            if token is not None:
                try:
                    await self._connect(prefill, decode)
                except BaseException:
                    with contextlib.suppress(StateError):
                        await asyncio.shield(self.pd.unlock(prefill.id, decode.id, token))
                    raise
                if await self.pd.mark_connected(prefill.id, decode.id, token):
                    return "connected"
                continue  # the lock expired meanwhile: whoever holds it now decides
            if time.monotonic() > deadline:
                raise PairError(f"timed out waiting for {prefill.id} -> {decode.id} to connect")
            await asyncio.sleep(delay)  # another process is connecting the pair
            delay = min(delay * 2, 0.2)

    async def _connect(self, prefill: Node, decode: Node) -> None:
        error: Exception | None = None
        for attempt in range(CONNECT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.2 * 2**attempt)
            try:
                await self._connect_once(prefill, decode)
                self.metrics.connects.inc((("result", "ok"),))
                log.info("connected %s -> %s", prefill.id, decode.id)
                return
            except PairMismatch as exc:
                error = exc
                break  # retrying cannot change a configuration
            except PairError as exc:
                error = exc
        self.metrics.connects.inc((("result", "failed"),))
        raise PairError(f"cannot connect {prefill.id} -> {decode.id}: {error}")

    async def _request(self, node: Node, path: str, body: Any = None) -> Any:
        try:
            status, data = await self.call(node, path, body)
        except Exception as exc:
            raise PairError(f"{path} on {node.id} failed: {exc}") from None
        if status != 200:
            text = data.decode("utf-8", "replace").strip()[:200]
            raise PairError(f"{path} on {node.id} answered {status}: {text}")
        try:
            return _json(data)
        except orjson.JSONDecodeError:
            raise PairError(f"{path} on {node.id} did not answer JSON") from None

    async def _connect_once(self, prefill: Node, decode: Node) -> None:
        p_config, d_config = await asyncio.gather(
            self._request(prefill, "/distserve/engine_info"),
            self._request(decode, "/distserve/engine_info"),
        )
        for node, config in ((prefill, p_config), (decode, d_config)):
            if not isinstance(config, dict) or "tp_size" not in config:
                raise PairError(f"{node.id} answered no engine config")
        if p_config["tp_size"] != d_config["tp_size"]:
            raise PairMismatch(
                f"tensor-parallel sizes differ: {prefill.id} tp={p_config['tp_size']}, "
                f"{decode.id} tp={d_config['tp_size']}"
            )
        rdma = {"with_gdr": True, "link_type": self.link_type}
        answers = []
        for local, remote, lc, rc in (
            (prefill, decode, p_config, d_config),
            (decode, prefill, d_config, p_config),
        ):
            init = {
                "local_engine_id": local.url,
                "local_engine_config": lc,
                "remote_engine_id": remote.url,
                "remote_engine_config": rc,
                "protocol": self.protocol,
                "rdma_config": rdma,
                "nvlink_config": None,
            }
            answer = await self._request(local, "/distserve/p2p_initialize", init)
            if not _succeeded(answer) or "engine_endpoint_info" not in answer:
                raise PairError(f"p2p_initialize on {local.id} did not succeed: {answer!r:.200}")
            answers.append(answer)
        p_init, d_init = answers
        for local, remote, remote_init in ((prefill, decode, d_init), (decode, prefill, p_init)):
            connect = {
                "protocol": self.protocol,
                "remote_engine_id": remote.url,
                "remote_engine_endpoint_info": remote_init["engine_endpoint_info"],
                "remote_kvtransfer_endpoint_info": remote_init.get("kvtransfer_endpoint_info", []),
            }
            answer = await self._request(local, "/distserve/p2p_connect", connect)
            if not _succeeded(answer):
                raise PairError(f"p2p_connect on {local.id} did not succeed: {answer!r:.200}")

    async def warmup(self) -> list[PairResult]:
        """Connect every active (prefill, decode) pair serving a common model."""
        store = self.pd.store
        view = await store.refresh_latest()
        nodes = view.registry.nodes
        active = [n for n in nodes if n.state is NodeState.ACTIVE]
        prefills = [n for n in active if n.role == Role.PREFILL]
        decodes = [n for n in active if n.role == Role.DECODE]
        pairs = [(p, d) for p in prefills for d in decodes if set(p.models) & set(d.models)]

        async def one(p: Node, d: Node) -> PairResult:
            try:
                return PairResult(p.id, d.id, await self.ensure(p, d))
            except (PairError, StoreUnavailable) as exc:
                return PairResult(p.id, d.id, "failed", str(exc))

        return list(await asyncio.gather(*(one(p, d) for p, d in pairs)))


class _Retry(Exception):
    """This attempt failed before the client got anything: try again if allowed."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(str(error))
        self.error = error


class _NoNode(Exception):
    """No node of this role can take the request now."""

    def __init__(self, role: Role) -> None:
        super().__init__(role.name)
        self.role = role


@dataclass(slots=True)
class _Prefilled:
    node: Node
    session_id: int
    block_ids: list[int]
    token_id: int
    sent: bool = False  # its decode request went out: the decode node may have taken it


def _request_object(body: bytes) -> dict[str, Any]:
    request = orjson.loads(body)
    if not isinstance(request, dict):
        raise BadRequest("the request body must be a JSON object")
    n = request.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n > 1):
        raise BadRequest("n > 1 is not supported with the DistServe serving strategy", param="n")
    return request


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

    async def serve(
        self,
        h: ProxyHandler,
        scope: Scope,
        exchange: _Exchange,
        body: bytes,
        model: str,
        request_id: str,
    ) -> None:
        request = _request_object(body)
        tried_p: list[str] = []
        tried_d: list[str] = []
        last_error: GatewayError | None = None
        for attempt in range(1, h.max_attempts + 1):
            if attempt > 1 and not h.may_retry():
                break
            rid = (request_id, attempt)
            prefilled: _Prefilled | None = None
            try:
                if not self.dummy:
                    prefilled = await self._prefill(
                        h, scope, exchange, request, model, rid, tried_p
                    )
                    if prefilled is None:
                        return  # the prefill node refused the request itself: relayed
                error = await self._decode(
                    h, scope, exchange, request, model, rid, prefilled, tried_d
                )
                if error is None:
                    return
                last_error = error
            except _Retry as retry:
                last_error = retry.error
            except _NoNode as none:
                if attempt > 1:
                    break
                raise h.no_node(model, none.role.name.title()) from None
            finally:
                if prefilled is not None and prefilled.session_id in self.owned:
                    # Cancelled (the client left), or failed before the decode node answered.
                    await asyncio.shield(
                        self._settle(prefilled.session_id, free=True, uncertain=prefilled.sent)
                    )
        raise last_error or h.no_node(model)

    async def _prefill(
        self,
        h: ProxyHandler,
        scope: Scope,
        exchange: _Exchange,
        request: dict[str, Any],
        model: str,
        rid: tuple[str, int],
        tried: list[str],
    ) -> _Prefilled | None:
        request_id, attempt = rid
        route = await self.router.pick(model, f"{request_id}.{attempt}.p", tried, role=Role.PREFILL)
        if route is None:
            raise _NoNode(Role.PREFILL)
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
                    node, "POST", scope["path"], scope["headers"], orjson.dumps(body), request_id
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
            h.metrics.attempts.inc((("node", node.id), ("result", f"prefill {status}")))
            if status != 200:
                await self._settle(session_id, free=False)  # a refused request holds nothing
                if 400 <= status < 500 and status != 429:
                    outcome = Outcome.NEUTRAL
                    exchange.attempts, exchange.route, exchange.node_id = attempt, route, node.id
                    await h._send_buffered(exchange, response, data, request_id, route)
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
        h: ProxyHandler,
        scope: Scope,
        exchange: _Exchange,
        request: dict[str, Any],
        model: str,
        rid: tuple[str, int],
        prefilled: _Prefilled | None,
        tried: list[str],
    ) -> GatewayError | None:
        request_id, attempt = rid
        route = await self.router.pick(model, f"{request_id}.{attempt}.d", tried, role=Role.DECODE)
        if route is None:
            raise _NoNode(Role.DECODE)  # serve() frees the session
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
        exchange.attempts, exchange.route = attempt, route
        final = attempt == h.max_attempts
        return await h._attempt(
            scope, exchange, body, model, request_id, route, final, settle=settle
        )
