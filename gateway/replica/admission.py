"""Admission for one replica: its requests that wait in the fleet's queue, and how they hear
that they were admitted.

A request that finds every fitting node at its ``max_inflight`` joins the queue in Redis
(:mod:`shared_state.admission`) and waits here on a future. The admitting script publishes the
admission on this replica's channel, which one listener task reads; a poller asks the store for
this replica's tickets every ``poll_s`` as a safety net. While the store is unreachable, the
replica admits by its own counts: a request waits for one of this replica's requests on a full
node to end. Either way nothing waits longer than the queue timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from gateway.common.tracing import tracer
from shared_state import Lease, Outcome, Priority, StateError, Store, StoreUnavailable
from shared_state import admission as fleet_queue

from .errors import QueueFull, QueueTimeout
from .metrics import GatewayMetrics

log = logging.getLogger("fleetgate.admission")

PRIORITY_NAMES = {p.name.lower(): p for p in Priority}


@dataclass(frozen=True, slots=True)
class Claim:
    """What a request brings to the queue: its priority and its client key's fair share."""

    priority: Priority = Priority.NORMAL
    fair_key: str = ""  # the client key (a digest prefix); "" for requests without one
    share: int = 1


@dataclass(slots=True)
class _Waiter:
    ticket: str
    model: str
    role: int
    future: asyncio.Future[str] = field(default_factory=lambda: _future())


def _future() -> asyncio.Future[str]:
    return asyncio.get_running_loop().create_future()


class TicketLost(Exception):
    """The ticket left the queue without an admission: its deadline passed."""


class Admission:
    """This replica's waiting requests: queued in the store, admitted by whichever replica
    frees a slot, heard here."""

    def __init__(
        self,
        store: Store,
        replica: str,
        metrics: GatewayMetrics,
        *,
        max_queue: int = 1000,
        timeout_s: float = 30.0,
        poll_s: float = 0.5,
    ) -> None:
        self.store = store
        self.replica = replica
        self.metrics = metrics
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.waiting: dict[str, _Waiter] = {}  # by lease member
        self._tasks: list[asyncio.Task[None]] = []
        self._local_freed = asyncio.Event()

    @property
    def retry_after_s(self) -> int:
        return max(1, round(self.timeout_s / 10))

    def tickets(self) -> dict[str, list[str]]:
        """This replica's tickets by the deadline set that holds them (renewed like leases)."""
        out: dict[str, list[str]] = defaultdict(list)
        for waiter in self.waiting.values():
            out[self.store.keys.queue_keys(waiter.model, waiter.role)[3]].append(waiter.ticket)
        return out

    # -- waiting in the fleet's queue -----------------------------------------------------

    async def wait(self, model: str, role: int, member: str, claim: Claim) -> str:
        """Queue ``member``'s request and wait until a node has room for it: the id of the
        node where its lease is now held. Raises :class:`QueueFull` or :class:`QueueTimeout`;
        :class:`StoreUnavailable` when the store fails before the request is queued."""
        self._start()
        started = time.monotonic()
        deadline = started + self.timeout_s
        labels = (("model", model), ("priority", claim.priority.name.lower()))
        self.metrics.queue_depth.inc(labels, 1)
        attributes = {"gen_ai.request.model": model, "fleetgate.priority": labels[1][1]}
        with tracer().span("fleetgate.queue", attributes) as waiting:
            try:
                while True:
                    node_id = await self._wait_once(model, role, member, claim, deadline)
                    if node_id is not None:
                        self.metrics.admissions.inc((("how", "queued"),))
                        waiting.set("fleetgate.node", node_id)
                        return node_id
            finally:
                self.metrics.queue_depth.inc(labels, -1)
                self.metrics.queue_wait.observe((("model", model),), time.monotonic() - started)

    async def _wait_once(
        self, model: str, role: int, member: str, claim: Claim, deadline: float
    ) -> str | None:
        """One ticket's wait: the node admitted to, or None when the ticket was lost."""
        joined = await fleet_queue.enqueue(
            self.store,
            model=model,
            role=role,
            member=member,
            priority=claim.priority,
            fair_key=claim.fair_key,
            share=claim.share,
            max_queue=self.max_queue,
        )
        if joined.status == "admitted":
            return joined.node_id
        if joined.status == "full":
            self.metrics.queue_refusals.inc((("reason", "full"),))
            raise QueueFull(
                f"every node serving `{model}` is at capacity and {joined.depth} requests "
                "wait for one already",
                self.retry_after_s,
            )
        waiter = _Waiter(joined.ticket, model, role)
        self.waiting[member] = waiter
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await waiter.future
        except TicketLost:
            return None
        except TimeoutError:
            node_id = await self._leave(waiter)
            if node_id:  # admitted just as the wait ran out
                return node_id
            self.metrics.queue_refusals.inc((("reason", "timeout"),))
            raise QueueTimeout(
                f"no node serving `{model}` had room within {self.timeout_s:g} s",
                self.retry_after_s,
            ) from None
        except asyncio.CancelledError:
            # The client left: out of the queue at once, and a slot it was given goes on.
            node_id = await asyncio.shield(self._leave(waiter))
            if node_id:
                await asyncio.shield(self._give_back(model, role, member, node_id))
            self.metrics.queue_refusals.inc((("reason", "client_gone"),))
            raise
        finally:
            self.waiting.pop(member, None)

    async def _leave(self, waiter: _Waiter) -> str:
        """Take ``waiter``'s ticket out of the queue: the node it was admitted to meanwhile,
        or "" when it left waiting (or the store cannot say: its ticket then expires)."""
        if waiter.future.done() and not waiter.future.cancelled():
            with contextlib.suppress(Exception):
                return waiter.future.result()
        try:
            status, node_id = await fleet_queue.dequeue(
                self.store, waiter.model, waiter.role, waiter.ticket
            )
        except (StoreUnavailable, StateError) as exc:
            log.warning("could not take ticket %s out of the queue: %s", waiter.ticket, exc)
            return ""
        return node_id if status == "admitted" else ""

    async def _give_back(self, model: str, role: int, member: str, node_id: str) -> None:
        """Release a lease a request got as it left, and admit the next in its place."""
        with contextlib.suppress(StoreUnavailable, StateError):
            await self.store.release(Lease(node_id, member), Outcome.NEUTRAL, 0.0)
            await fleet_queue.admit(self.store, model, role)

    # -- hearing of admissions -------------------------------------------------------------

    def _start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._listen()), loop.create_task(self._poll())]

    def _admitted(self, member: str, node_id: str) -> None:
        waiter = self.waiting.get(member)
        if waiter is not None and not waiter.future.done():
            waiter.future.set_result(node_id)

    async def _listen(self) -> None:
        """Admissions as the store publishes them; subscribed again after a store failure."""
        while True:
            try:
                async for admitted in fleet_queue.admissions(self.store, self.replica):
                    self._admitted(admitted.member, admitted.node_id)
            except StoreUnavailable:
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("admission listener failed")
                await asyncio.sleep(1.0)

    async def _poll(self) -> None:
        """Every ``poll_s`` while requests wait: admit what has room (a node added or raised,
        leases of a dead replica expired) and learn of admissions a lost message missed."""
        while True:
            await asyncio.sleep(self.poll_s)
            by_queue: dict[tuple[str, int], list[_Waiter]] = defaultdict(list)
            for waiter in list(self.waiting.values()):
                by_queue[(waiter.model, waiter.role)].append(waiter)
            for (model, role), waiters in by_queue.items():
                try:
                    report = await fleet_queue.admit(
                        self.store, model, role, [w.ticket for w in waiters]
                    )
                except (StoreUnavailable, StateError):
                    continue
                for waiter, status in zip(waiters, report.statuses, strict=False):
                    if waiter.future.done() or status == "queued":
                        continue
                    if status:
                        waiter.future.set_result(status)
                    else:
                        waiter.future.set_exception(TicketLost())

    async def after_release(self, models: tuple[str, ...], roles: tuple[int, ...]) -> None:
        """A lease on a node with a capacity ended: admit the queues it may serve. A request of
        this replica admitted so goes on at once, without waiting for its message."""
        mine = self.replica + ":"
        for model in models:
            for role in roles:
                try:
                    report = await fleet_queue.admit(self.store, model, role)
                except (StoreUnavailable, StateError):
                    return
                for admitted in report.admitted:
                    if admitted.member.startswith(mine):
                        self._admitted(admitted.member, admitted.node_id)

    # -- the local fallback -----------------------------------------------------------------

    def local_freed(self) -> None:
        """One of this replica's local leases ended (the store unreachable)."""
        self._local_freed.set()

    async def wait_local(self, deadline: float) -> bool:
        """Wait until one of this replica's local leases ends; False at ``deadline``."""
        self._local_freed.clear()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._local_freed.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
