"""The typed async API over the shared state: registry, pick-and-reserve, release, renew.

This is the only module that issues Redis commands: the other modules of ``shared_state``
(health, pd, limits, prefix_index, key_store) build keys and arguments and go through
:meth:`Store.run_script` and the plain reads below. Replies become msgspec Structs, ints or
strings before they leave it; Redis failures become :class:`StoreUnavailable` within the short
socket timeout, and a breaker then fails fast until the store answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc

from . import scripts
from .candidates import PickRequest
from .candidates import candidates as pick_candidates
from .connection import close_redis, drop_connections, is_embedded, open_redis
from .errors import (
    InvalidInput,
    NodesFull,
    StoreReadOnly,
    StoreRefusingWrites,
    StoreUnavailable,
    UnknownNode,
    UnknownStrategy,
    brief,
    refusal_of,
)
from .key_records import key_admission, key_limits, stored_json
from .key_store import KeyStore
from .model import (
    Lease,
    Node,
    NodeState,
    NodeStatus,
    Outcome,
    Pick,
    Priority,
    Registry,
    Release,
    Role,
    Strategy,
)
from .pipeline import AutoPipeline
from .prefix import PrefixSettings, pick_args, release_args, validate_capacity
from .registry import (
    RegistryView,
    decode_node,
    encode_models,
    normalize_url,
    validate_api_key,
    validate_max_inflight,
    validate_models,
    validate_positive,
    validate_role,
)
from .registry_cache import RegistryCache
from .schema import KeySchema
from .scripts import ScriptClient


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Tunables of routing state; times in milliseconds as the scripts take them."""

    lease_ms: int = 30_000
    latency_window: int = 15
    latency_prior_ms: float = 0.0  # 0: a new node's prior is the mean of the others
    explore: float = 0.02
    failure_penalty_ms: float = 10_000.0
    eject_threshold: int = 5
    eject_base_ms: int = 5_000
    eject_max_ms: int = 300_000
    cache_stale_ms: int = 15_000
    cache_share: float = 0.02
    affinity_epsilon: float = 0.25
    full_scan_limit: int = 32
    sample_size: int = 8
    breaker_cooldown_s: float = 1.0
    # The share of a node's max_inflight kept for high priority (floor of the product).
    priority_reserve: float = 0.1
    prefix: PrefixSettings = dataclasses.field(default_factory=PrefixSettings)


_REDIS_DOWN = (rexc.ConnectionError, rexc.TimeoutError, OSError, asyncio.TimeoutError)


class Store(KeyStore):
    """Shared routing state of one gateway replica (or of an ops tool)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        schema: KeySchema | None = None,
        settings: StoreSettings | None = None,
        rng: random.Random | None = None,
        embedded: bool = False,
        fast: AutoPipeline | None = None,
    ) -> None:
        self.client = client
        # Scripts go through the pipelined connection when there is one; other commands
        # (registry reads, ops) through redis-py.
        self.scripts: ScriptClient = fast or client
        self._fast = fast
        self.keys = schema or KeySchema()
        self.settings = settings or StoreSettings()
        self.embedded = embedded
        self._rng = rng or random.Random()
        self.cache = RegistryCache(self)
        self._open_until = 0.0

    @classmethod
    def open(
        cls,
        url: str | None,
        *,
        prefix: str = "fleetgate",
        timeout_s: float = 0.5,
        settings: StoreSettings | None = None,
        rng: random.Random | None = None,
    ) -> Store:
        """Open the store at ``url`` (``None``: the embedded, in-process store)."""
        fast = None
        if url is not None and urlsplit(url).scheme in {"redis", "rediss", "unix"}:
            fast = AutoPipeline(url, timeout_s=timeout_s)
        return cls(
            open_redis(url, timeout_s=timeout_s),
            schema=KeySchema(prefix),
            settings=settings,
            rng=rng,
            embedded=is_embedded(url),
            fast=fast,
        )

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.aclose()
        await close_redis(self.client)

    @property
    def pipelined(self) -> bool:
        """Script calls made in one pass of the event loop reach Redis in one write, in the
        order they were made (a plain Redis URL; not Sentinel, not the embedded store)."""
        return self._fast is not None

    # -- failure handling -------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while the breaker is open: the store failed within the cooldown."""
        return time.monotonic() < self._open_until

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Turn Redis failures into :class:`StoreUnavailable` (:class:`StoreRefusingWrites` when
        it answers but refuses writes); open the breaker when it does not serve at all."""
        if self.degraded:
            raise StoreUnavailable("store unreachable (breaker open)")
        try:
            yield
        except _REDIS_DOWN as exc:
            self._open_until = time.monotonic() + self.settings.breaker_cooldown_s
            raise StoreUnavailable(f"store unreachable: {brief(exc)}") from None
        except rexc.ResponseError as exc:
            if "unknown node" in str(exc):
                raise UnknownNode(str(exc).split("unknown node", 1)[-1].strip()) from None
            refusal = refusal_of(exc)
            if refusal is None:
                raise
            # No breaker when only writes are refused: the server answers at once.
            if not isinstance(refusal, StoreRefusingWrites):
                self._open_until = time.monotonic() + self.settings.breaker_cooldown_s
            elif isinstance(refusal, StoreReadOnly):  # new connections find the moved master
                if self._fast is not None:
                    self._fast.reconnect("the server became a replica")
                await drop_connections(self.client)
            raise refusal from None

    async def run_script(self, script: scripts.Script, keys: list[str], args: list[Any]) -> Any:
        """Run one Lua script, on the pipelined connection when there is one."""
        async with self.guard():
            return await script(self.scripts, keys, args)

    async def read_hash(self, key: str) -> dict[str, str]:
        """Every field of one hash (a read outside any script: not atomic with a pick)."""
        async with self.guard():
            return cast(dict[str, str], await self.client.hgetall(key))

    async def hash_has(self, key: str, field: str) -> bool:
        async with self.guard():
            return bool(await self.client.hexists(key, field))

    async def read_list(self, key: str, limit: int) -> list[str]:
        """The first ``limit`` items of one list."""
        async with self.guard():
            return cast(list[str], await self.client.lrange(key, 0, limit - 1))

    async def read_value(self, key: str) -> str | None:
        """One string key's value; None when it does not exist."""
        async with self.guard():
            return cast(str | None, await self.client.get(key))

    async def _server_ms(self) -> int:
        """The Redis server's clock, the one every lease deadline is written in."""
        sec, usec = await self.client.time()
        return int(sec) * 1000 + int(usec) // 1000

    async def ping(self) -> bool:
        """True when the store answers now (ignores the breaker)."""
        try:
            await self.client.ping()
        except _REDIS_DOWN:
            self._open_until = time.monotonic() + self.settings.breaker_cooldown_s
            return False
        self._open_until = 0.0
        return True

    # -- registry ---------------------------------------------------------------------

    async def add_node(
        self,
        url: str,
        models: Iterable[str],
        *,
        role: int = Role.HYBRID,
        speed: float | None = None,
        weight: float = 1.0,
        api_key: str | None = None,
        insecure: bool = False,
        state: NodeState = NodeState.ACTIVE,
        reason: str = "registered",
        cache_blocks: int | None = None,
        max_inflight: int | None = None,
    ) -> tuple[Node, bool]:
        """Register a node, or update it if its URL is known; returns it and whether it is new.
        ``max_inflight`` caps the requests it runs at once across the fleet (``None``: none)."""
        node_id = normalize_url(url)
        most = None if max_inflight is None else validate_max_inflight(max_inflight)
        fields: dict[str, str] = {
            "url": node_id,
            "models": encode_models(validate_models(models)),
            "role": str(int(validate_role(role))),
            "speed": "" if speed is None else repr(validate_positive("speed", speed)),
            "weight": repr(validate_positive("weight", weight)),
            "api_key": validate_api_key(api_key or ""),
            "insecure": "1" if insecure else "",
            "state": NodeState(state).value,
            "state_reason": reason,
            "cache_blocks": "" if cache_blocks is None else str(validate_capacity(cache_blocks)),
            "max_inflight": "" if most is None else str(most),
        }
        created = await self._upsert(node_id, fields, create=True)
        return await self.get_node(node_id), created

    async def update_node(
        self,
        url: str,
        *,
        models: Iterable[str] | None = None,
        role: int | None = None,
        speed: float | None = None,
        weight: float | None = None,
        api_key: str | None = None,
        insecure: bool | None = None,
        cache_blocks: int | None = None,
        max_inflight: int | None = None,
    ) -> Node:
        """Change some fields of a known node (``api_key=""`` removes its key, ``max_inflight=0``
        its capacity: unlimited again)."""
        node_id = normalize_url(url)
        fields: dict[str, str] = {}
        if models is not None:
            fields["models"] = encode_models(validate_models(models))
        if role is not None:
            fields["role"] = str(int(validate_role(role)))
        if speed is not None:
            fields["speed"] = repr(validate_positive("speed", speed))
        if weight is not None:
            fields["weight"] = repr(validate_positive("weight", weight))
        if api_key is not None:
            fields["api_key"] = validate_api_key(api_key)
        if insecure is not None:
            fields["insecure"] = "1" if insecure else ""
        if cache_blocks is not None:
            fields["cache_blocks"] = str(validate_capacity(cache_blocks))
        if max_inflight == 0 and type(max_inflight) is int:
            fields["max_inflight"] = ""  # unlimited again
        elif max_inflight is not None:
            fields["max_inflight"] = str(validate_max_inflight(max_inflight))
        await self._upsert(node_id, fields, create=False)
        return await self.get_node(node_id)

    async def set_state(self, url: str, state: NodeState, reason: str = "") -> Node:
        """Move a known node to ``state``, recording why; every replica sees it at once."""
        node_id = normalize_url(url)
        state = NodeState(state)
        await self._upsert(node_id, {"state": state.value, "state_reason": reason}, create=False)
        return await self.get_node(node_id)

    async def drain(self, url: str) -> Node:
        """Stop routing new requests to a node; requests in flight finish."""
        return await self.set_state(url, NodeState.DRAINING, "drained by operator")

    async def _upsert(self, node_id: str, fields: dict[str, str], *, create: bool) -> bool:
        flat = [v for kv in fields.items() for v in kv]
        keys = [self.keys.nodes, self.keys.node(node_id), self.keys.epoch]
        created, _epoch = await self.run_script(
            scripts.NODE_UPSERT, keys, [node_id, "1" if create else "0", *flat]
        )
        return bool(created)

    async def remove_node(self, url: str) -> None:
        """Remove a node with its leases and history; :class:`UnknownNode` if it is not there."""
        node_id = normalize_url(url)
        keys = [
            self.keys.nodes,
            *self.keys.node_keys(node_id),
            self.keys.ejected,
            self.keys.epoch,
            self.keys.prefix_blocks(node_id),
        ]
        removed, _epoch = await self.run_script(scripts.NODE_REMOVE, keys, [node_id])
        if not removed:
            raise UnknownNode(node_id)

    async def get_node(self, url: str) -> Node:
        node_id = normalize_url(url)
        async with self.guard():
            fields = cast(dict[str, str], await self.client.hgetall(self.keys.node(node_id)))
        if not fields:
            raise UnknownNode(node_id)
        return decode_node(fields)

    async def epoch(self) -> int:
        async with self.guard():
            value = await self.client.get(self.keys.epoch)
        return int(value or 0)

    async def registry(self) -> Registry:
        """Read the whole registry (ops tools and cache refreshes; never per request).

        Not a MULTI: a Redis out of memory refuses to queue even reads in a transaction, and
        the registry must stay readable then. One pipeline reads the epoch and generation
        before and after the rest; the read is repeated while they or the node set moved in
        between (every registry change bumps the epoch, a restore renews the generation).
        """
        async with self.guard():
            members = cast(set[str], await self.client.smembers(self.keys.nodes))
            for _ in range(10):
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.get(self.keys.epoch)
                    pipe.hgetall(self.keys.api_keys)
                    pipe.exists(self.keys.keys_required)
                    pipe.hget(self.keys.restore_record, "generation")
                    pipe.smembers(self.keys.nodes)
                    for node_id in sorted(members):
                        pipe.hgetall(self.keys.node(node_id))
                    pipe.get(self.keys.epoch)
                    pipe.hget(self.keys.restore_record, "generation")
                    replies = await pipe.execute()
                moved = replies[-2:] != [replies[0], replies[3]]
                if not moved and replies[4] == members:
                    break
                members = replies[4]
            replies = replies[:-2]
        nodes = tuple(decode_node(f) for f in replies[5:] if f)
        api_keys = cast(dict[str, str], replies[1])
        records = {digest: stored_json(raw) for digest, raw in api_keys.items()}
        limits = {digest: key_limits(meta) for digest, meta in records.items()}
        limited = {digest: pair for digest, pair in limits.items() if pair != (0, 0)}
        admission = {digest: key_admission(meta) for digest, meta in records.items()}
        return Registry(
            epoch=int(replies[0] or 0),
            nodes=nodes,
            key_digests=frozenset(api_keys),
            key_limits=limited,
            key_admission={d: a for d, a in admission.items() if a is not None},
            keys_required=bool(api_keys) or bool(replies[2]),
            key_entries=api_keys,
            generation=str(replies[3] or ""),
        )

    async def view(self) -> RegistryView:
        """The cached registry view, read from the store on first use."""
        return self.cache.view or await self.cache.refresh()

    @property
    def cached_view(self) -> RegistryView | None:
        """The last registry view read, even while the store is unreachable."""
        return self.cache.view

    async def refresh(self, seen_epoch: int | None = None) -> RegistryView:
        """Re-read the registry unless the view is at ``seen_epoch`` (see RegistryCache)."""
        return await self.cache.refresh(seen_epoch)

    async def refresh_latest(self) -> RegistryView:
        """The view at the store's current epoch: re-read only if the registry changed."""
        return await self.cache.refresh_latest()

    async def registry_stamp(self) -> tuple[int, str]:
        """The registry's epoch (0 when missing) and generation ("" when it has none)."""
        async with self.guard():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(self.keys.epoch)
                pipe.hget(self.keys.restore_record, "generation")
                epoch, generation = await pipe.execute()
        return int(epoch or 0), str(generation or "")

    async def status(self) -> list[NodeStatus]:
        """Every node with its leases in force, recent latencies and prefix blocks held."""
        registry = await self.registry()
        async with self.guard():
            now_ms = await self._server_ms()
            async with self.client.pipeline(transaction=False) as pipe:
                for node in registry.nodes:
                    pipe.zcount(self.keys.leases(node.id), now_ms, "+inf")
                    pipe.lrange(self.keys.latencies(node.id), 0, -1)
                    pipe.zcard(self.keys.prefix_blocks(node.id))
                replies = await pipe.execute()
        return [
            NodeStatus(
                node=node,
                in_flight=int(replies[3 * i]),
                latencies_s=tuple(float(v) / 1000 for v in replies[3 * i + 1]),
                prefix_blocks=int(replies[3 * i + 2]),
            )
            for i, node in enumerate(registry.nodes)
        ]

    async def live_replicas(self, alive_ms: int) -> dict[str, int]:
        """Gateway replicas that renewed their leases within ``alive_ms``, with the time (ms)."""
        async with self.guard():
            now_ms = await self._server_ms()
            rows = cast(
                list[tuple[str, float]],
                await self.client.zrangebyscore(
                    self.keys.replicas, now_ms - alive_ms, "+inf", withscores=True
                ),
            )
        return {str(row[0]): int(row[1]) for row in rows}

    # -- client API keys (stored as SHA-256 digests only) -------------------------------

    async def key_exists(self, digest: str) -> bool:
        """Whether a key with this hex SHA-256 digest is stored (one pipelined command)."""
        async with self.guard():
            if isinstance(self.scripts, AutoPipeline):
                return bool(await self.scripts.execute("HEXISTS", self.keys.api_keys, digest))
            return bool(await self.client.hexists(self.keys.api_keys, digest))

    async def in_flight(self, url: str) -> int:
        """Leases in force on one node."""
        node_id = normalize_url(url)
        async with self.guard():
            now_ms = await self._server_ms()
            return int(await self.client.zcount(self.keys.leases(node_id), now_ms, "+inf"))

    # -- routing ----------------------------------------------------------------------

    async def pick(
        self,
        model: str,
        *,
        strategy: Strategy | str,
        replica: str,
        request_id: str,
        role: int = 0,
        exclude: Iterable[str] = (),
        seed: int | None = None,
        session_key: str | None = None,
        blocks: Sequence[str] = (),
        priority: Priority = Priority.NORMAL,
        only: str | None = None,
    ) -> Pick | None:
        """Choose a node for ``model`` and reserve a lease on it, in one atomic script.

        ``None`` when no active node can take it; raises :class:`NodesFull` when the fitting
        nodes are at capacity, or requests wait for one (:mod:`.admission` queues it). Calling
        again with the same replica and request id while the lease is held returns the same
        node and keeps one lease.
        ``session_key`` steers ``session_affinity`` (without one it acts as
        ``min_expected_latency``); ``blocks``, the prompt's chain of block hashes, ``cache_aware``.
        """
        strategy = _strategy(strategy)
        if not isinstance(model, str) or not model:
            raise InvalidInput("model must be a non-empty string")
        if not replica or not request_id or ":" in replica:
            raise InvalidInput("replica and request id must be non-empty (replica without ':')")
        if strategy is Strategy.SESSION_AFFINITY and not session_key:
            strategy = Strategy.MIN_EXPECTED_LATENCY
        member = f"{replica}:{request_id}"
        request = PickRequest(
            model,
            strategy,
            member,
            role,
            tuple(exclude),
            seed,
            session_key,
            tuple(blocks),
            int(priority),
            only,
        )
        view = await self.view()
        result = await self._pick_once(view, request)
        if result is not None and result[0] is not None:
            return result[0]
        if result is not None and result[2]:
            raise NodesFull(result[2])
        # No candidate in the cache may only mean the cache is old: ask the epoch.
        epoch = result[1] if result is not None else await self.epoch()
        if epoch != view.epoch:
            # The registry moved since this replica cached it: try once more on the new one.
            view = await self.refresh(epoch)
            again = await self._pick_once(view, request)
            if again is not None and again[0] is not None:
                return again[0]
            if again is not None and again[2]:
                raise NodesFull(again[2])
        if self.cache.loss is not None:  # not restored yet: route on the cached registry
            raise StoreUnavailable(self.cache.loss.describe())
        return None

    async def _pick_once(
        self, view: RegistryView, request: PickRequest
    ) -> tuple[Pick | None, int, int] | None:
        """(the pick or None, the store's epoch, fitting nodes at capacity when it found
        none); ``None`` when the view has no candidate."""
        s = self.settings
        candidates = pick_candidates(view, request, s.full_scan_limit, s.sample_size, self._rng)
        if not candidates:
            return None
        keys = [self.keys.epoch, self.keys.cursor]
        cached = request.strategy is Strategy.CACHE_AWARE
        for node_id in candidates:
            keys.extend(self.keys.node_keys(node_id))
            if cached:  # pick_prefix.lua's third key of a candidate: its prefix block set
                keys[-1] = self.keys.prefix_blocks(node_id)
        keys.extend(self.keys.queue_keys(request.model, request.role)[:3])
        seed = request.seed
        args = [
            request.member,
            request.strategy.value,
            s.lease_ms,
            seed if seed is not None else self._rng.randint(1, 2_147_483_646),
            request.model,
            int(request.role),
            s.latency_prior_ms,
            s.explore,
            s.cache_stale_ms,
            s.cache_share,
            s.affinity_epsilon,
            request.priority + 1,
            s.priority_reserve,
            *(pick_args(s.prefix, request.blocks) if cached else ()),
        ]
        reply = await self.run_script(scripts.PICK_PREFIX if cached else scripts.PICK, keys, args)
        node_id, in_flight, score, epoch, eligible, reused, _known, full, *prefix = reply
        epoch = int(epoch)
        if epoch != view.epoch:
            asyncio.get_running_loop().create_task(self._quiet_refresh(epoch))
        if not node_id:
            return None, epoch, int(full)
        node = view.by_id[node_id]
        return (
            Pick(
                lease=Lease(node_id, request.member, max(1, int(in_flight))),
                node=node,
                in_flight=int(in_flight),
                score=float(score),
                epoch=epoch,
                eligible=int(eligible),
                reused=bool(reused),
                strategy=request.strategy,
                prefix_matched=int(prefix[0]) if prefix else 0,
                prefix_total=int(prefix[1]) if prefix else 0,
            ),
            epoch,
            0,
        )

    async def _quiet_refresh(self, epoch: int) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.refresh(epoch)

    async def release(
        self,
        lease: Lease,
        outcome: Outcome,
        latency_s: float,
        tokens: int = 0,
        forget: Sequence[str] = (),
    ) -> Release:
        """End ``lease``; record ``outcome`` and ``latency_s`` only if the lease was held.

        A good answer's latency is recorded per unit of load (divided by ``lease.load``) and per
        output token when ``tokens`` is known; a failure's is recorded whole, and at least the
        failure penalty. ``forget``: prompt blocks the node's answer said it did not hold, removed
        from its prefix block set in the same call."""
        outcome = Outcome(outcome)
        s = self.settings
        if outcome is Outcome.OK:
            latency_s /= max(1, lease.load)
            if tokens > 0:
                latency_s /= tokens
        pool: list[str] = []
        if outcome is Outcome.FAIL:
            view = self.cache.view
            pool = view.pool(lease.node_id) if view is not None else [lease.node_id]
        others = [p for p in pool if p != lease.node_id]
        keys = [*self.keys.node_keys(lease.node_id), self.keys.ejected]
        if forget:
            keys.append(self.keys.prefix_blocks(lease.node_id))
        args = [
            lease.member,
            outcome.value,
            round(max(latency_s, 0.0) * 1000, 3),
            s.latency_window,
            s.failure_penalty_ms,
            s.eject_threshold,
            s.eject_base_ms,
            s.eject_max_ms,
            max(len(pool), 1),
            *release_args(forget),
            *others,
        ]
        released, fails, until, now = await self.run_script(scripts.RELEASE, keys, args)
        return Release(
            released=bool(released),
            consecutive_failures=int(fails),
            ejected_until_ms=int(until),
            ejected_now=bool(now),
        )

    async def renew(
        self,
        replica: str,
        leases: Iterable[Lease],
        tickets: Mapping[str, Sequence[str]] | None = None,
    ) -> int:
        """Extend all of ``replica``'s live leases in one call, and its ``tickets`` in the
        fleet's queue (by the deadline set that holds them); returns how many were renewed."""
        by_node: dict[str, list[str]] = defaultdict(list)
        for lease in leases:
            by_node[lease.node_id].append(lease.member)
        keys = [self.keys.replicas]
        args: list[Any] = [replica, self.settings.lease_ms]
        sets = {self.keys.leases(node_id): m for node_id, m in by_node.items()}
        for key, members in [*sets.items(), *(tickets or {}).items()]:
            keys.append(key)
            args.append(len(members))
            args.extend(members)
        return int(await self.run_script(scripts.RENEW, keys, args))


def _strategy(value: Strategy | str) -> Strategy:
    try:
        return Strategy(value)
    except ValueError:
        names = ", ".join(s.value for s in Strategy)
        raise UnknownStrategy(f"unknown strategy {value!r}; expected one of: {names}") from None
