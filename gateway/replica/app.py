"""The gateway application: the OpenAI hot path as raw ASGI in front of a Starlette app for
everything else (models, node API, health, readiness, metrics), and their shared lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from gateway.common.metrics import Counter, Merge
from gateway.common.pd_cleanup import DistServeMetrics, PDCleaner
from shared_state import (
    Node,
    NodeState,
    PDState,
    PrefixSettings,
    StateError,
    Store,
    StoreRefusingWrites,
    StoreSettings,
    StoreUnavailable,
    Strategy,
    UnknownNode,
)
from shared_state.registry import model_ids
from shared_state.registry_cache import read_restore_record

from .accesslog import AccessLog
from .admission import Admission
from .auth import Authenticator
from .distserve import DistServe, control_call
from .endpoints import is_proxied
from .errors import BadRequest, GatewayError, MethodNotAllowed, NotFound, render
from .exchange import Forwarder
from .metrics import GatewayMetrics
from .nodes_api import NodesAPI, json_response, read_admin_body
from .openapi import ApiDocs
from .proxy import ProxyHandler, closing_unread, framed_twice, request_id_of
from .receipts import Receipts
from .routing import Router
from .settings import GatewaySettings
from .shutdown import Drain
from .status_page import StatusPage
from .upstream import Timeouts, Upstream, UpstreamFailure
from .worker_metrics import WorkerMetrics

log = logging.getLogger("fleetgate.gateway")

EMBEDDED_WARNING = (
    "no --redis-url: using the embedded in-process store; state is private to this process, "
    "so several replicas (or workers) need a shared Redis"
)


class Gateway:
    """Everything one gateway process holds, built from its settings."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: Store | None = None,
        metrics_folder: Path | None = None,
    ) -> None:
        self.settings = settings
        self.replica = settings.replica()
        store_settings = StoreSettings(
            lease_ms=int(settings.lease_seconds * 1000),
            priority_reserve=settings.priority_reserve,
            prefix=PrefixSettings(
                default_capacity_blocks=settings.prefix_cache_blocks,
                whole_prompts=settings.prefix_cache_unit == "prompts",
                balance=settings.prefix_balance,
                balance_slack=settings.prefix_balance_slack,
                request_blocks=settings.prefix_request_blocks,
            ),
        )
        self.store = store or Store.open(
            settings.redis_url,
            prefix=settings.prefix,
            timeout_s=settings.store_timeout,
            settings=store_settings,
        )
        self.metrics = GatewayMetrics()
        # With --workers, a scrape sums every worker's figures (exchanged in metrics_folder).
        self.worker_metrics = WorkerMetrics(self.metrics, metrics_folder)
        self.registry_restores = Counter(
            "fleetgate_registry_restores_total",
            "Registries this replica restored into a store that had lost its own.",
        )
        self.metrics.extra.append(self.registry_restores)
        if not self.store.embedded:  # an in-process store cannot lose what this process holds
            self.store.cache.restore_as(self.replica, self.registry_restores.inc)
        admission = Admission(
            self.store,
            self.replica,
            self.metrics,
            max_queue=settings.max_queue,
            timeout_s=settings.queue_timeout,
        )
        self.router = Router(
            self.store, self.replica, settings.strategy, self.metrics, admission=admission
        )
        self.upstream = Upstream(
            Timeouts(
                settings.connect_timeout, settings.first_byte_timeout, settings.request_timeout
            ),
            ca_bundle=settings.upstream_ca_bundle,
        )
        self.access_log = AccessLog() if settings.access_log else None
        self.auth = Authenticator(
            settings.api_key, settings.admin_key, settings.register_allow, self.store
        )
        self.distserve: DistServe | None = None
        if settings.serving_strategy == "DistServe":
            self.distserve = DistServe(settings, self.router, self.upstream)
            cleaner = self.distserve.cleaner
        else:  # Hybrid still cleans up after a PD node removed through this replica
            cleaner = PDCleaner(
                PDState(self.store), control_call(self.upstream), DistServeMetrics()
            )
        self.metrics.extra.extend(cleaner.metrics.counters())
        self.nodes = NodesAPI(
            self.store, self.upstream, self.auth, cleaner, body_timeout_s=settings.body_timeout
        )
        forwarder = Forwarder(
            self.router, self.upstream, self.metrics, max_attempts=settings.max_attempts
        )
        receipts = Receipts()  # the latest requests' route receipts, for the status page
        self.proxy = ProxyHandler(
            forwarder,
            self.auth,
            max_body_bytes=settings.max_body_bytes,
            body_timeout_s=settings.body_timeout,
            access_log=self.access_log,
            distserve=self.distserve,
            prefix_block_bytes=(
                settings.prefix_block_bytes if settings.strategy is Strategy.CACHE_AWARE else None
            ),
            receipts=receipts,
        )
        self.status_page = StatusPage(self.store, self.auth, receipts, self.replica)
        self._tasks: list[asyncio.Task[None]] = []
        self.drain = Drain()  # the proxied requests in flight, cut at shutdown
        self._register_metrics()

    def _register_metrics(self) -> None:
        self.metrics.gauge(
            "fleetgate_degraded",
            "1 while the store is unreachable or refuses this replica's leases (routing then "
            "uses local counts).",
            lambda: [((), 1.0 if self.router.degraded else 0.0)],
            Merge.MAX,
        )
        self.metrics.gauge(
            "fleetgate_in_flight",
            "Requests this replica has in flight, by node.",
            lambda: [((("node", k),), float(v)) for k, v in self.router.local_in_flight.items()],
        )
        self.metrics.gauge(
            "fleetgate_in_flight_total",
            "Requests this replica has in flight (for autoscaling).",
            lambda: [((), float(sum(self.router.local_in_flight.values())))],
        )

        def node_states() -> list[tuple[tuple[tuple[str, str], ...], float]]:
            view = self.store.cached_view
            counts = dict.fromkeys(NodeState, 0)
            for node in view.registry.nodes if view else ():
                counts[node.state] += 1
            return [((("state", s.value),), float(c)) for s, c in counts.items()]

        # Every worker reads the same registry: its counts are not summed.
        self.metrics.gauge(
            "fleetgate_nodes", "Registered nodes by state.", node_states, Merge.LOCAL
        )
        self.metrics.gauge(
            "fleetgate_registry_lost",
            "1 while the store has lost the registry and it is not restored yet.",
            lambda: [((), 1.0 if self.store.cache.loss is not None else 0.0)],
            Merge.MAX,
        )

    async def start(self) -> None:
        if self.store.embedded:
            log.warning(EMBEDDED_WARNING)
        try:
            await self.store.refresh()
        except StoreUnavailable as exc:
            log.warning("store unreachable at start (%s): will retry", exc)
        self.router.start()
        await self.worker_metrics.start()
        if self.distserve is not None:
            self.distserve.start()
        if self.settings.node:
            self._tasks.append(asyncio.get_running_loop().create_task(self._register_nodes()))

    async def stop(self) -> None:
        await self.drain.stop()  # leases are released while the store is still open
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.distserve is not None:
            await self.distserve.stop()
        await self.router.stop()
        if self.access_log is not None:
            self.access_log.flush()
        await self.upstream.close()
        await self.store.close()
        await self.worker_metrics.stop()

    async def _register_nodes(self) -> None:
        """Register the --node URLs, asking each its models; retry until each answers."""
        pending = list(self.settings.node)
        delay = 0.5
        while pending:
            for url in list(pending):
                probe = Node(id=url, url=url, models=())
                try:
                    listing = await self.upstream.get_json(probe, "/v1/models")
                    models = model_ids(listing)
                    try:
                        # Known already (another replica, an operator): keep its speed,
                        # weight and state, which a rolling restart must not undo.
                        await self.store.update_node(url, models=models)
                    except UnknownNode:
                        await self.store.add_node(url, models, reason="--node at start")
                    await self.store.refresh_latest()
                    pending.remove(url)
                    log.info("registered node %s with models %s", url, models)
                except (UpstreamFailure, StateError) as exc:
                    log.warning("node %s not registered yet: %s", url, exc)
            if pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # -- Starlette endpoints -------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        await self.auth.check_client(request.headers.raw)
        with contextlib.suppress(StoreUnavailable):
            await self.store.refresh_latest()
        view = self.store.cached_view
        names = view.models() if view else []
        return json_response(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fleetgate", "root": m}
                    for m in names
                ],
            }
        )

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok", "replica": self.replica})

    async def ready(self, request: Request) -> Response:
        store_ok = await self.store.ping()
        view = self.store.cached_view
        if store_ok:
            with contextlib.suppress(StoreUnavailable):
                view = await self.store.refresh_latest()
        active = sum(1 for n in view.registry.nodes if n.state is NodeState.ACTIVE) if view else 0
        # A store that answers pings but refuses writes (OOM, READONLY) cannot hold leases.
        renew_failure = self.router.renew_failure
        reasons = [
            *([] if store_ok else ["store unreachable"]),
            *([f"lease renewals failing: {renew_failure}"] if renew_failure else []),
            *([] if active else ["no active node"]),
        ]
        loss = self.store.cache.loss
        if loss is not None:
            reasons.insert(0, loss.describe())
        ready = not reasons
        body = {
            "ready": ready,
            "store": _store_state(store_ok, renew_failure),
            "degraded": self.router.degraded or not store_ok,
            "active_nodes": active,
            "replica": self.replica,
            "reasons": reasons,
            "registry": await self._registry_state(store_ok),
        }
        return json_response(body, 200 if ready else 503)

    async def _registry_state(self, store_ok: bool) -> dict[str, Any]:
        """The registry as /ready reports it: its epoch, whether the store lost it, the last
        loss this replica saw and the store's record of the last restore (by any replica)."""
        cache = self.store.cache
        view = cache.view
        record = None
        if store_ok:
            with contextlib.suppress(StoreUnavailable):
                record = await read_restore_record(self.store)
        last = cache.loss or cache.last_loss
        return {
            "epoch": view.epoch if view else None,
            "lost": cache.loss is not None,
            "restores_by_this_replica": cache.restores,
            "last_loss": None if last is None else {**asdict(last), "summary": last.describe()},
            "last_restore": None
            if record is None or not record.restored
            else msgspec.to_builtins(record),
        }

    def _distserve(self, request: Request) -> DistServe:
        self.auth.check_admin(request.headers.raw, request.client.host if request.client else None)
        if self.distserve is None:
            raise BadRequest(
                "this gateway serves Hybrid; start it with --serving-strategy DistServe"
            )
        return self.distserve

    async def connection_warmup(self, request: Request) -> Response:
        """Connect every (Prefill, Decode) pair now, instead of at its first request."""
        distserve = self._distserve(request)
        # The body is unused, but bounded like every admin body.
        await read_admin_body(request, self.settings.body_timeout)
        results = await distserve.connector.warmup()
        failed = [r for r in results if r.status == "failed"]
        body: dict[str, Any] = {
            "success": not failed,
            "pairs": [
                {"prefill": r.prefill, "decode": r.decode, "status": r.status, "detail": r.detail}
                for r in results
            ],
            "connected": sum(r.status == "connected" for r in results),
            "already_connected": sum(r.status == "already_connected" for r in results),
            "failed": len(failed),
        }
        if failed:
            body["error"] = {
                "message": f"{len(failed)} of {len(results)} pairs could not be connected",
                "type": "upstream_error",
                "param": None,
                "code": "pair_connect_failed",
            }
        return json_response(body, 502 if failed else 200)

    async def gc(self, request: Request) -> Response:
        """Free prefill sessions whose migration is over or orphaned."""
        distserve = self._distserve(request)
        # The body is unused, but bounded like every admin body.
        await read_admin_body(request, self.settings.body_timeout)
        live = await self.store.live_replicas(self.store.settings.lease_ms)
        report = await distserve.cleaner.gc(set(live) | {self.replica})
        return json_response({"success": report["failed"] == 0, **report})

    async def metrics_text(self, request: Request) -> Response:
        body = await self.worker_metrics.render()
        return Response(body, media_type="text/plain; version=0.0.4")


def _store_state(store_ok: bool, renew_failure: StoreUnavailable | None) -> str:
    """The store as /ready names it: ok, unreachable, refusing writes or failing."""
    if not store_ok:
        return "unreachable"
    if isinstance(renew_failure, StoreRefusingWrites):
        return "refusing writes"
    return "failing" if renew_failure else "ok"


async def _error_handler(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            exc = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
            if allow:
                exc.headers = ((b"allow", allow.encode()),)
        elif exc.status_code == 404:
            exc = NotFound(f"no route {request.url.path}")
        else:
            exc = GatewayError(str(exc.detail))
    elif not isinstance(exc, GatewayError | StateError):
        log.exception("unhandled error on %s", request.url.path)
    status, body, extra = render(exc)
    headers = {k.decode(): v.decode() for k, v in extra}
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def build_starlette(gateway: Gateway) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes = [
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/ready", gateway.ready, methods=["GET"]),
        Route("/metrics", gateway.metrics_text, methods=["GET"]),
        Route("/nodes/status", gateway.nodes.status, methods=["GET"]),
        Route("/nodes/replicas", gateway.nodes.replicas, methods=["GET"]),
        Route("/nodes/events", gateway.status_page.events, methods=["GET"]),
        Route("/nodes/receipts", gateway.status_page.receipts_json, methods=["GET"]),
        Route("/nodes/checker", gateway.status_page.checker, methods=["GET"]),
        Route("/ui", gateway.status_page.page, methods=["GET"]),
        Route("/nodes/add", gateway.nodes.add, methods=["POST"]),
        Route("/nodes/remove", gateway.nodes.remove, methods=["POST"]),
        Route("/nodes/drain", gateway.nodes.drain, methods=["POST"]),
        Route("/nodes/terminate", gateway.nodes.terminate, methods=["POST"]),
        Route("/nodes/terminate_all", gateway.nodes.terminate_all, methods=["GET"]),
        Route("/distserve/connection_warmup", gateway.connection_warmup, methods=["POST"]),
        Route("/distserve/gc", gateway.gc, methods=["POST"]),
        *ApiDocs().routes(),  # /openapi.json, /docs
    ]
    handlers: dict[Any, Any] = {HTTPException: _error_handler, Exception: _error_handler}
    for cls in (GatewayError, StateError):
        handlers[cls] = _error_handler
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


class GatewayApp:
    """ASGI entry: OpenAI generation paths go straight to the proxy handler, the rest to
    Starlette (its router and request objects cost more than the hot path can afford).
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.starlette = build_starlette(gateway)
        self.proxy = gateway.proxy
        self.drain = gateway.drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.starlette(scope, receive, send)
        elif is_proxied(scope["path"]) or framed_twice(scope["headers"]):
            # The proxy handler also refuses a request framed twice, whatever its path.
            await self.drain.serve(self.proxy, scope, receive, send)
        else:
            receive, send = closing_unread(scope, receive, with_request_id(scope, send))
            await self.starlette(scope, receive, send)


def with_request_id(scope: Scope, send: Send) -> Send:
    """Wrap ``send`` so the answer carries ``x-request-id``, like every proxied answer."""
    header = (b"x-request-id", request_id_of(scope["headers"]).encode())

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return send_with_id


def create_app(
    settings: GatewaySettings, store: Store | None = None, metrics_folder: Path | None = None
) -> GatewayApp:
    return GatewayApp(Gateway(settings, store, metrics_folder))
