"""LMDeploy's node API: /nodes/status, /nodes/add, /nodes/remove, plus /nodes/drain.

``/nodes/add`` accepts ``lmdeploy serve api_server --proxy-url``'s self-registration payload
unchanged: ``{"url": ..., "status": {"models": [...], "role": 1}}``, or just ``{"url"}``, in
which case the node is asked for its models. Registering a known node changes only the fields
the payload carries, and never its state (a drain holds); a known node sending the ``status``
payload again has restarted, so its prefix blocks (cache_aware) are dropped. An admin may set
every field; a caller let in by ``--register-allow`` only registers itself: a URL whose host
resolves to the caller's own address, with its models, role (and, when new, speed,
prefix-cache capacity and requests at once) and nothing an operator sets.

Every admin body (``/nodes/*``, ``/distserve/*``) is read bounded: over ``ADMIN_BODY_MAX_BYTES``
it is a 413, by its Content-Length before any byte, or as soon as the bytes counted pass it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.common.pd_cleanup import PDCleaner
from shared_state import (
    InvalidInput,
    Node,
    NodeStatus,
    PrefixIndex,
    Role,
    Store,
    UnknownNode,
    normalize_url,
)
from shared_state import admission as fleet_queue
from shared_state.prefix import validate_capacity
from shared_state.registry import model_ids, validate_max_inflight

from .auth import Authenticator
from .errors import (
    BadRequest,
    BodyTooLarge,
    Forbidden,
    InvalidJSON,
    RequestTimeout,
    UpstreamError,
)
from .upstream import Upstream, UpstreamFailure

ROLE_NAMES = {"hybrid": Role.HYBRID, "prefill": Role.PREFILL, "decode": Role.DECODE}
UNSPECIFIED_HOSTS = frozenset({"0.0.0.0", "::", "[::]"})
ADMIN_BODY_MAX_BYTES = 1 << 20  # a registration of 4096 long model names still fits
RESOLVE_TIMEOUT_S = 2.0
# What only an admin sets on a node: a self-registration carrying one of them is refused.
OPERATOR_FIELDS = ("api_key", "weight", "insecure")


PRIORITIES = ("high", "normal", "low")


def json_response(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def node_status_entry(status: NodeStatus) -> dict[str, Any]:
    """LMDeploy's status fields first, then what fleetgate knows besides."""
    node = status.node
    return {
        "models": list(node.models),
        "unfinished": status.in_flight,
        "latency": list(status.latencies_s),
        "speed": node.speed,
        "role": int(node.role),
        "state": node.state.value,
        "state_reason": node.state_reason,
        "state_since_ms": node.state_since_ms,
        "weight": node.weight,
        "has_api_key": node.api_key is not None,
        "insecure": node.insecure,
        "ejected_until_ms": node.ejected_until_ms,
        "consecutive_failures": node.consecutive_failures,
        "ok_total": node.ok_total,
        "fail_total": node.fail_total,
        "cache_blocks": node.cache_blocks,
        "prefix_blocks": status.prefix_blocks,
        "max_inflight": node.max_inflight,
        "kv_cache_usage": node.kv_usage,
        "requests_running": node.kv_running,
        "requests_waiting": node.kv_waiting,
        "probe": {
            "failures": node.probe_failures,
            "successes": node.probe_successes,
            "last_ms": node.last_probe_ms,
            "detail": node.probe_detail,
        },
    }


def node_json(node: Node) -> dict[str, Any]:
    return {
        "url": node.url,
        "models": list(node.models),
        "role": int(node.role),
        "speed": node.speed,
        "weight": node.weight,
        "cache_blocks": node.cache_blocks,
        "max_inflight": node.max_inflight,
        "state": node.state.value,
    }


def substitute_host(url: str, client_host: str | None) -> str:
    """Replace an unspecified listen address (0.0.0.0, ::) with the caller's address."""
    parts = urlsplit(url)
    if parts.hostname not in UNSPECIFIED_HOSTS or not client_host:
        return url
    host = client_host
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _role(value: object) -> int:
    if value is None:
        return Role.HYBRID
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("enginerole.")
        if key in ROLE_NAMES:
            return ROLE_NAMES[key]
        if key.isdigit():
            return int(key)
        raise BadRequest(f"unknown role {value!r}", param="role")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BadRequest(f"unknown role {value!r}", param="role")


def _speed(value: object) -> float | None:
    # LMDeploy sends null, or sometimes -1 for "unknown".
    if value is None or (isinstance(value, int | float) and value <= 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest("speed must be a number", param="speed")
    return float(value)


def _cache_blocks(value: object) -> int | None:
    if value is None:
        return None
    try:
        return validate_capacity(value)
    except InvalidInput as exc:
        raise BadRequest(str(exc), param="cache_blocks") from None


def _max_inflight(value: object) -> int | None:
    if value is None:
        return None
    try:
        return validate_max_inflight(value)
    except InvalidInput as exc:
        raise BadRequest(str(exc), param="max_inflight") from None


async def read_admin_body(request: Request, timeout_s: float) -> bytes:
    """The body of an admin call; :class:`BodyTooLarge` once it passes ``ADMIN_BODY_MAX_BYTES``
    (by its Content-Length before reading, else by counting), :class:`RequestTimeout` when it
    has not all arrived within ``timeout_s``."""
    too_large = BodyTooLarge(f"an admin request body may hold at most {ADMIN_BODY_MAX_BYTES} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > ADMIN_BODY_MAX_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > ADMIN_BODY_MAX_BYTES:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


async def _json_object(request: Request, timeout_s: float) -> dict[str, Any]:
    body = await read_admin_body(request, timeout_s)
    if not body.strip():
        return {}
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidJSON("request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


def _client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, IPv4-mapped IPv6 written as IPv4; None for anything else."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


async def check_own_address(url: str, caller: str | None) -> None:
    """Allow a self-registration only for a URL whose host resolves to the caller's address,
    or raise :class:`Forbidden`: a node registers itself, never another host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    own = _address(caller or "")
    if own is None:
        raise Forbidden("a node registers itself from its own address", param="url")
    literal = _address(host)
    if literal is not None:
        resolved = {literal}
    else:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, parts.port or 80, type=socket.SOCK_STREAM
                )
        except (OSError, TimeoutError):
            raise Forbidden(
                f"the host of {url} could not be resolved to check it is the caller's own",
                param="url",
            ) from None
        resolved = {a for info in infos if (a := _address(str(info[4][0]))) is not None}
    if own not in resolved:
        raise Forbidden(
            f"a node registers itself only: {url} is not at the caller's address {own}; "
            "an admin key registers other hosts",
            param="url",
        )


class NodesAPI:
    def __init__(
        self,
        store: Store,
        upstream: Upstream,
        auth: Authenticator,
        cleaner: PDCleaner,
        *,
        body_timeout_s: float,
    ) -> None:
        self.store = store
        self.body_timeout_s = body_timeout_s
        self.upstream = upstream
        self.auth = auth
        self.cleaner = cleaner  # a node that leaves takes its DistServe pairs and sessions

    async def status(self, request: Request) -> Response:
        await self.auth.check_reader(request.headers.raw, _client_host(request))
        statuses = await self.store.status()
        entries = {s.node.url: node_status_entry(s) for s in statuses}
        # Each node shows the fleet's queue of each of its models: requests waiting for room.
        waiting = await fleet_queue.depths(self.store, [s.node for s in statuses])
        for status in statuses:
            entries[status.node.url]["queue"] = {
                model: dict(zip(PRIORITIES, waiting.get(model, (0, 0, 0)), strict=True))
                for model in status.node.models
            }
        response = json_response(entries)
        # LMDeploy's shape is one entry per node URL, so replicas go in a header.
        replicas = await self.store.live_replicas(self.store.settings.lease_ms)
        response.headers["x-fleetgate-live-replicas"] = str(len(replicas))
        return response

    async def replicas(self, request: Request) -> Response:
        """Gateway replicas renewing their leases (alive within one lease time)."""
        await self.auth.check_reader(request.headers.raw, _client_host(request))
        replicas = await self.store.live_replicas(self.store.settings.lease_ms)
        return json_response({"replicas": replicas, "count": len(replicas)})

    async def add(self, request: Request) -> Response:
        caller = _client_host(request)
        admin = self.auth.check_register(request.headers.raw, caller)
        payload = await _json_object(request, self.body_timeout_s)
        url = payload.get("url", request.query_params.get("node_url"))
        if not isinstance(url, str) or not url.strip():
            raise BadRequest('body must carry the node\'s url: {"url": "http://host:port"}')
        try:
            url = normalize_url(substitute_host(url.strip(), caller))
        except ValueError as exc:  # urlsplit's verdict on a broken host or port
            raise BadRequest(f"node url {url!r} is malformed: {exc}", param="url") from None
        if not admin:
            for field in OPERATOR_FIELDS:
                if field in payload:
                    raise Forbidden(f"only an admin may set {field}", param=field)
            await check_own_address(url, caller)
        status = payload.get("status") or {}
        if not isinstance(status, dict):
            raise BadRequest("status must be an object")
        api_key = payload.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            raise BadRequest("api_key must be a string", param="api_key")
        insecure = payload.get("insecure")
        if insecure is not None and not isinstance(insecure, bool):
            raise BadRequest("insecure must be true or false", param="insecure")
        raw_role = status.get("role", payload.get("role"))
        role = None if raw_role is None else _role(raw_role)
        speed = _speed(status.get("speed", payload.get("speed")))
        cache_blocks = _cache_blocks(status.get("cache_blocks", payload.get("cache_blocks")))
        max_inflight = _max_inflight(status.get("max_inflight", payload.get("max_inflight")))
        known = await self._known(url)
        models = status.get("models") or payload.get("models")
        if not models:
            probe_key = api_key if api_key is not None else (known and known.api_key)
            probe_insecure = insecure if insecure is not None else bool(known and known.insecure)
            models = await self._ask_models(url, probe_key or None, probe_insecure)
        if not isinstance(models, list):
            raise BadRequest("models must be a list of names", param="models")
        created = False
        try:
            if known is None:
                raise UnknownNode(url)
            # Only what the payload carries changes; the state (a drain) never does, and a
            # node registering itself refreshes only what it knows of itself.
            node = await self.store.update_node(
                url,
                models=models,
                role=role,
                speed=speed if admin else None,
                weight=payload.get("weight"),
                api_key=api_key,
                insecure=insecure,
                cache_blocks=cache_blocks if admin else None,
                max_inflight=max_inflight if admin else None,
            )
        except UnknownNode:
            node, created = await self.store.add_node(
                url,
                models,
                role=Role.HYBRID if role is None else role,
                speed=speed,
                weight=payload.get("weight", 1.0),
                api_key=api_key,
                insecure=bool(insecure),
                reason="registered through /nodes/add",
                cache_blocks=cache_blocks,
                max_inflight=max_inflight,
            )
        if not created and node.role != Role.HYBRID:
            # A DistServe engine that registers again has restarted: its connections are gone.
            await self.cleaner.drop_node(node.id)
        if not created and payload.get("status"):
            # So has an engine sending its registration again: its KV cache is empty.
            await PrefixIndex(self.store).forget(node.id)
        await self.store.refresh_latest()
        return json_response(
            {"message": "Added successfully", "created": created, "node": node_json(node)}
        )

    async def _known(self, url: str) -> Node | None:
        try:
            return await self.store.get_node(url)
        except UnknownNode:
            return None

    async def _ask_models(self, url: str, api_key: str | None, insecure: bool) -> list[str]:
        probe = Node(id=url, url=url, models=(), api_key=api_key, insecure=insecure)
        try:
            listing = await self.upstream.get_json(probe, "/v1/models")
        except UpstreamFailure as exc:
            raise UpstreamError(
                f"no models given and the node's /v1/models could not be read: {exc}"
            ) from None
        models = model_ids(listing)
        if not models:
            raise UpstreamError("the node's /v1/models lists no models")
        return models

    async def _target(self, request: Request) -> str:
        payload = await _json_object(request, self.body_timeout_s)
        url = payload.get("url", request.query_params.get("node_url"))
        if not isinstance(url, str):
            raise BadRequest('body must carry the node\'s url: {"url": "http://host:port"}')
        try:
            return normalize_url(url)
        except InvalidInput as exc:
            raise BadRequest(str(exc), param="url") from None

    async def remove(self, request: Request) -> Response:
        self.auth.check_admin(request.headers.raw, _client_host(request))
        url = await self._target(request)
        await self.store.remove_node(url)
        dropped = await self.cleaner.drop_node(url)
        await self.store.refresh_latest()
        return json_response({"message": "Deleted successfully", "url": url, "distserve": dropped})

    async def _terminate(self, node: Node) -> dict[str, Any]:
        """Remove a node, then ask it to stop through its /terminate; say what happened."""
        url = node.id
        await self.store.remove_node(url)
        await self.cleaner.drop_node(url)
        outcome: dict[str, Any] = {"url": url, "removed": True, "terminated": False}
        try:
            status, body = await self.upstream.control(node, "POST", "/terminate")
        except UpstreamFailure as exc:
            outcome["detail"] = f"the node could not be asked to stop: {exc}"
            return outcome
        if 200 <= status < 300:
            outcome["terminated"] = True
        else:
            text = body.decode("utf-8", "replace").strip()[:200]
            outcome["detail"] = f"the node answered {status} to /terminate: {text}"
        return outcome

    async def terminate(self, request: Request) -> Response:
        """LMDeploy's /nodes/terminate: 200 when the node stopped, 502 when it was removed
        from the registry but could not be stopped."""
        self.auth.check_admin(request.headers.raw, _client_host(request))
        outcome = await self._terminate(await self.store.get_node(await self._target(request)))
        await self.store.refresh_latest()
        if outcome["terminated"]:
            return json_response({"message": "Terminated successfully", **outcome})
        return json_response(
            {
                "error": {
                    "message": f"removed {outcome['url']}, but {outcome['detail']}",
                    "type": "upstream_error",
                    "param": "url",
                    "code": "terminate_failed",
                },
                **outcome,
            },
            502,
        )

    async def terminate_all(self, request: Request) -> Response:
        """LMDeploy's /nodes/terminate_all: every node removed and asked to stop."""
        self.auth.check_admin(request.headers.raw, _client_host(request))
        # The body is unused, but bounded like every admin body.
        await read_admin_body(request, self.body_timeout_s)
        registry = await self.store.registry()
        results = [await self._terminate(node) for node in registry.nodes]
        await self.store.refresh_latest()
        failed = [r for r in results if not r["terminated"]]
        body = {
            "message": "Terminated successfully" if not failed else "Some nodes did not stop",
            "nodes": {r["url"]: r for r in results},
        }
        return json_response(body, 502 if failed else 200)

    async def drain(self, request: Request) -> Response:
        self.auth.check_admin(request.headers.raw, _client_host(request))
        url = await self._target(request)
        node = await self.store.drain(url)
        in_flight = await self.store.in_flight(url)
        return json_response(
            {"message": "Draining", "node": node_json(node), "unfinished": in_flight}
        )
