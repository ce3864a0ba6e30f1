"""Routing for one replica: pick through the shared state, fall back to local counts when
the store is unreachable, keep this replica's leases renewed, and budget retries.

With ``cache_aware`` a pick carries the prompt's prefix chain and a release the engine's count
of cached prompt tokens, which corrects the shared prefix index when it predicted too much.
The local fallback is cache-blind (``min_expected_latency`` on local counts) and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass

from shared_state import (
    Lease,
    Node,
    NodesFull,
    Outcome,
    Priority,
    RegistryView,
    Release,
    Role,
    StateError,
    Store,
    StoreUnavailable,
    Strategy,
)

from .admission import Admission, Claim
from .errors import QueueTimeout
from .metrics import GatewayMetrics
from .prefix import PrefixChain

log = logging.getLogger("fleetgate.routing")


@dataclass(slots=True)
class Route:
    """A node chosen for one attempt, and how: through the store or from local counts."""

    node: Node
    lease: Lease
    local: bool
    in_flight: int
    eligible: int
    score: float = 0.0
    epoch: int = 0
    strategy: str = ""
    chain: PrefixChain | None = None  # cache_aware: the prompt's blocks
    prefix_matched: int = 0  # of them, held by the node before this pick
    queued_ms: float | None = None  # the wait in the fleet's queue, when it waited

    def receipt(self, attempts: int) -> str:
        """The compact why of this route, for the ``x-fleetgate-route`` header."""
        source = "local" if self.local else "shared"
        text = (
            f"strategy={self.strategy}; candidates={self.eligible}; score={self.score:.6g}; "
            f"epoch={self.epoch}; attempts={attempts}; state={source}"
        )
        if self.queued_ms is not None:
            text += f"; queued_ms={self.queued_ms:.0f}"
        if self.chain is not None:
            matched = "blind" if self.local else str(self.prefix_matched)
            text += f"; prefix={matched}/{len(self.chain.blocks)} blocks"
        return text


class RetryBudget:
    """Retries may add at most ``ratio`` of the requests seen, plus a small floor.

    A token bucket fed by requests: it keeps a failing fleet from being hit by a retry storm.
    """

    # Tokens are counted in thousandths, so that ten requests at 0.2 make exactly two.
    UNIT = 1000

    def __init__(self, ratio: float = 0.2, floor: float = 10.0, cap: float = 100.0) -> None:
        self._earn = round(ratio * self.UNIT)
        self._cap = round(cap * self.UNIT)
        self._tokens = round(floor * self.UNIT)

    def on_request(self) -> None:
        self._tokens = min(self._cap, self._tokens + self._earn)

    def try_spend(self) -> bool:
        if self._tokens >= self.UNIT:
            self._tokens -= self.UNIT
            return True
        return False


class Router:
    """Chooses nodes for this replica and owns its leases."""

    def __init__(
        self,
        store: Store,
        replica: str,
        strategy: Strategy,
        metrics: GatewayMetrics,
        rng: random.Random | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.store = store
        self.admission = admission or Admission(store, replica, metrics)
        self.replica = replica
        self.strategy = strategy
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.leases: dict[str, Lease] = {}
        self.local_in_flight: Counter[str] = Counter()
        self.degraded_since: float | None = None
        # Why the last lease renewal failed, until one succeeds again (shown by /ready).
        self.renew_failure: StoreUnavailable | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None

    # -- picking -------------------------------------------------------------------------

    async def pick(
        self,
        model: str,
        request_id: str,
        exclude: list[str],
        role: int = 0,
        session_key: str | None = None,
        chain: PrefixChain | None = None,
        claim: Claim | None = None,
        only: str | None = None,
        wait: bool = True,
    ) -> Route | None:
        """A node for one attempt, its lease held; ``None`` when no node can serve ``model``.
        When the fitting nodes are at capacity the request waits in the fleet's queue (as
        ``claim`` places it), raising :class:`QueueFull` or :class:`QueueTimeout`. ``only``:
        the one node that may take it (it holds the state the request continues); without
        ``wait`` a full node raises :class:`NodesFull` instead."""
        try:
            pick = await self.store.pick(
                model,
                strategy=self.strategy,
                replica=self.replica,
                request_id=request_id,
                role=role,
                exclude=exclude,
                session_key=session_key,
                blocks=chain.blocks if chain is not None else (),
                priority=claim.priority if claim is not None else Priority.NORMAL,
                only=only,
            )
        except NodesFull as full:
            if not wait:
                raise
            if only is not None:  # the queue admits to any node: this request needs that one
                return await self._pinned_when_room(model, request_id, exclude, role, only, claim)
            return await self._queued(model, request_id, exclude, role, chain, claim, full)
        except StoreUnavailable as exc:
            self.metrics.store_errors.inc((("op", "pick"),))
            self._enter_degraded(exc)
            if only is not None:  # the local fallback may only pick that node, too
                view = self.store.cached_view
                fits = view.candidates(model, role) if view is not None else []
                exclude = [n for n in fits if n != only]
            route = await self._local_route(model, request_id, exclude, role)
            if route is not None:
                route.chain = chain
            return route
        self.degraded_since = None
        if pick is None:
            return None
        if pick.node.max_inflight:
            self.metrics.admissions.inc((("how", "direct"),))
        self.leases[pick.lease.member] = pick.lease
        self.local_in_flight[pick.node.id] += 1
        if chain is not None:
            self.metrics.prefix_blocks.inc((("kind", "total"),), len(chain.blocks))
            self.metrics.prefix_blocks.inc((("kind", "matched"),), pick.prefix_matched)
        return Route(
            pick.node,
            pick.lease,
            False,
            pick.in_flight,
            pick.eligible,
            pick.score,
            pick.epoch,
            pick.strategy.value,
            chain,
            pick.prefix_matched,
        )

    async def _pinned_when_room(
        self,
        model: str,
        request_id: str,
        exclude: list[str],
        role: int,
        only: str,
        claim: Claim | None,
    ) -> Route | None:
        """A request that only one node can take, and that node full: ask again every 50 ms
        until the queue timeout (the fleet's queue would admit it to any node)."""
        started = time.monotonic()
        deadline = started + self.admission.timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            with contextlib.suppress(NodesFull):
                route = await self.pick(
                    model, request_id, exclude, role, claim=claim, only=only, wait=False
                )
                if route is not None:
                    route.queued_ms = (time.monotonic() - started) * 1000
                return route
        self.metrics.queue_refusals.inc((("reason", "timeout"),))
        raise QueueTimeout(
            f"node {only}, which holds the state this request continues, had no room within "
            f"{self.admission.timeout_s:g} s",
            self.admission.retry_after_s,
        )

    async def _queued(
        self,
        model: str,
        request_id: str,
        exclude: list[str],
        role: int,
        chain: PrefixChain | None,
        claim: Claim | None,
        full: NodesFull,
    ) -> Route | None:
        """Wait in the fleet's queue for a node with room: the route to the node admitted to."""
        member = f"{self.replica}:{request_id}"
        started = time.monotonic()
        try:
            node_id = await self.admission.wait(model, role, member, claim or Claim())
        except StoreUnavailable as exc:
            self.metrics.store_errors.inc((("op", "enqueue"),))
            self._enter_degraded(exc)
            return await self._local_route(model, request_id, exclude, role)
        view = self.store.cached_view
        node = view.by_id.get(node_id) if view is not None else None
        if node is None:
            with contextlib.suppress(StoreUnavailable):
                view = await self.store.refresh_latest()
                node = view.by_id.get(node_id)
        if node is None or view is None:  # admitted to a node removed meanwhile
            with contextlib.suppress(StoreUnavailable, StateError):
                await self.store.release(Lease(node_id, member), Outcome.NEUTRAL, 0.0)
            return None
        lease = Lease(node_id, member, node.max_inflight or 1)
        self.leases[member] = lease
        self.local_in_flight[node_id] += 1
        return Route(
            node,
            lease,
            False,
            node.max_inflight or 0,
            full.nodes,
            0.0,
            view.epoch,
            self.strategy.value,
            chain,
            queued_ms=(time.monotonic() - started) * 1000,
        )

    @property
    def degraded(self) -> bool:
        """The store failed the last pick, or refuses to renew this replica's leases (out of
        memory, read-only): a pick that happens to pass in between does not end that, or
        ``/ready`` and ``fleetgate_degraded`` would flicker while Redis refuses writes."""
        return self.degraded_since is not None or self.renew_failure is not None

    def _enter_degraded(self, cause: StoreUnavailable) -> None:
        if self.degraded_since is None:
            self.degraded_since = time.monotonic()
            log.warning("%s: routing on the last registry snapshot and local counts", cause)

    async def _local_route(
        self, model: str, request_id: str, exclude: list[str], role: int
    ) -> Route | None:
        """The local fallback, which admits by this replica's own counts: while every fitting
        node is at its capacity here, wait for one of this replica's requests to end."""
        started = time.monotonic()
        deadline = started + self.admission.timeout_s
        while True:
            try:
                route = self._local_pick(model, request_id, exclude, role)
            except NodesFull:
                route = None
            else:
                if route is not None and route.node.max_inflight:
                    self.metrics.admissions.inc((("how", "local"),))
                    if time.monotonic() - started > 0.001:
                        route.queued_ms = (time.monotonic() - started) * 1000
                return route
            if not await self.admission.wait_local(deadline):
                self.metrics.queue_refusals.inc((("reason", "timeout"),))
                raise QueueTimeout(
                    f"no node serving `{model}` had room within "
                    f"{self.admission.timeout_s:g} s (the store is unreachable: this replica "
                    "admits by its own counts)",
                    self.admission.retry_after_s,
                )

    def _local_pick(
        self, model: str, request_id: str, exclude: list[str], role: int
    ) -> Route | None:
        """min_expected_latency on this replica's own in-flight counts, from the cached view;
        raises :class:`NodesFull` when every fitting node is at its capacity by those counts."""
        view = self.store.cached_view
        if view is None:
            return None
        ids = view.candidates(model, role, exclude)
        if not ids:
            return None
        fitting = [view.by_id[i] for i in ids]
        nodes = [
            n for n in fitting if not n.max_inflight or self.local_in_flight[n.id] < n.max_inflight
        ]
        if not nodes:
            raise NodesFull(len(fitting))
        speeds = [n.speed for n in nodes if n.speed]
        mean = sum(speeds) / len(speeds) if speeds else 1.0
        best: list[Node] = []
        best_score = float("inf")
        for node in nodes:
            score = (self.local_in_flight[node.id] + 1) / (node.speed or mean)
            if score < best_score - 1e-12:
                best, best_score = [node], score
            elif abs(score - best_score) <= 1e-12:
                best.append(node)
        node = self.rng.choice(best)
        self.local_in_flight[node.id] += 1
        lease = Lease(node.id, f"{self.replica}:{request_id}")
        return Route(
            node,
            lease,
            True,
            self.local_in_flight[node.id],
            len(nodes),
            best_score,
            view.epoch,
            "min_expected_latency",
        )

    def view(self) -> RegistryView | None:
        return self.store.cached_view

    # -- releasing -----------------------------------------------------------------------

    async def release(
        self,
        route: Route,
        outcome: Outcome,
        latency_s: float,
        tokens: int = 0,
        cached: tuple[int, int] | None = None,
    ) -> None:
        """End a route's lease; never raises (a lease the store missed expires by itself).
        ``cached``: the answer's (prompt tokens, cached tokens), when it reported both."""
        self.local_in_flight[route.node.id] -= 1
        if self.local_in_flight[route.node.id] <= 0:
            del self.local_in_flight[route.node.id]
        if route.node.max_inflight:
            self.admission.local_freed()
        if route.local:
            return
        self.leases.pop(route.lease.member, None)
        forget = self._forgotten(route, cached) if outcome is Outcome.OK else ()
        releasing = self.store.release(route.lease, outcome, latency_s, tokens, forget)
        node = route.node
        roles = (0,) if node.role is Role.HYBRID else (0, int(node.role))
        outcome_of_release: Release | BaseException
        if node.max_inflight and self.store.pipelined:
            # The slot goes to the queue's head at once, on whichever replica it waits: the
            # admission pass is sent with the release, in the same write (the pipeline keeps
            # their order), so the slot is never free for a round trip.
            done = await asyncio.gather(
                releasing, self.admission.after_release(node.models, roles), return_exceptions=True
            )
            outcome_of_release = done[0]
        else:
            try:
                outcome_of_release = await releasing
            except (StoreUnavailable, StateError) as exc:
                outcome_of_release = exc
            if node.max_inflight:
                await self.admission.after_release(node.models, roles)
        if isinstance(outcome_of_release, StoreUnavailable):
            self.metrics.store_errors.inc((("op", "release"),))
        elif isinstance(outcome_of_release, BaseException):
            log.error("release of %s failed: %r", route.lease.member, outcome_of_release)
        elif outcome_of_release.ejected_now:
            self.metrics.ejections.inc((("node", node.id),))

    def _forgotten(self, route: Route, cached: tuple[int, int] | None) -> tuple[str, ...]:
        """The prompt blocks the node's answer says it did not hold, though the pick said so."""
        if route.chain is None or cached is None:
            return ()
        forget = route.chain.forgotten(route.prefix_matched, *cached)
        if forget:
            self.metrics.prefix_blocks.inc((("kind", "forgotten"),), len(forget))
        return forget

    # -- lease renewal -------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._renewer = loop.create_task(self._renew_forever())
        self._follower = loop.create_task(self._follow_registry())

    async def _follow_registry(self) -> None:
        """Re-read the registry within a second of any change (a node drained, a key revoked),
        even on a replica that gets no traffic to learn the new epoch from."""
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(StoreUnavailable):
                await self.store.refresh_latest()

    async def _renew_forever(self) -> None:
        interval = self.store.settings.lease_ms / 1000 / 3
        while True:
            try:
                # Renewing also records this replica as alive, so it runs at start too.
                await self.store.renew(
                    self.replica, list(self.leases.values()), self.admission.tickets()
                )
                if self.renew_failure is not None:
                    log.info("lease renewals work again")
                    self.renew_failure = None
                if self.degraded_since is not None and await self.store.ping():
                    self.degraded_since = None
            except StoreUnavailable as exc:
                self.metrics.store_errors.inc((("op", "renew"),))
                if self.renew_failure is None:
                    log.warning("lease renewal failed: %s", exc)
                self.renew_failure = exc
                self._enter_degraded(exc)
            except Exception:
                log.exception("lease renewal failed")
            # While renewals fail, try every second: /ready says the store is back within a
            # second of it, not a third of a lease later (10 s with the default lease).
            await asyncio.sleep(min(interval, 1.0) if self.renew_failure else interval)

    async def stop(self) -> None:
        """Stop renewing and give back every lease this replica still holds."""
        await self.admission.stop()
        for task in (self._renewer, self._follower):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for lease in list(self.leases.values()):
            with contextlib.suppress(StateError):
                await self.store.release(lease, Outcome.NEUTRAL, 0.0)
        self.leases.clear()
