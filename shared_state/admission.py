"""The fleet's queue: requests that found every fitting node at its ``max_inflight`` wait in
Redis, one queue per model and role for all replicas, and are admitted in one atomic step that
takes a ticket out and leases it a node (``enqueue.lua``, ``admit.lua``, ``dequeue.lua``).

Order: strict priority, then weighted fair shares between client keys (start-time fair
queuing), then arrival. An admitted ticket's replica hears at once on its own channel
(Redis pub/sub, published by the admitting script); a replica whose requests wait also asks
now and then (:func:`admit` with its tickets), so a message lost with a connection delays a
request by that interval and loses nothing. Tickets carry deadlines that their replica renews
like leases: the tickets of a replica that died leave the queue within a lease time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import msgspec

from . import scripts
from .errors import InvalidInput
from .model import Node, Priority, Role
from .store import Store

log = logging.getLogger("fleetgate.admission")

MAX_SHARE = 1000


class Enqueued(msgspec.Struct, frozen=True):
    """What joining the queue did: ``admitted`` (a lease on ``node_id`` is held now),
    ``queued`` (``ticket`` waits) or ``full`` (the queue holds its most: nothing stored)."""

    status: str
    ticket: str
    node_id: str
    depth: int


class Admitted(msgspec.Struct, frozen=True):
    """A waiting request admitted to a node: its lease ``member`` is held on ``node_id``."""

    member: str
    node_id: str


class QueueReport(msgspec.Struct, frozen=True):
    """After an admission pass: tickets still waiting, the admissions it made, and for each
    ticket asked about "queued", the node it was admitted to, or "" (dropped)."""

    depth: int
    admitted: tuple[Admitted, ...]
    statuses: tuple[str, ...]


def _queue_keys(store: Store, model: str, role: int) -> list[str]:
    """The queue's keys, then every fitting node's hash and lease set (the nodes are few
    wherever requests wait, and every one of them may have room)."""
    keys = list(store.keys.queue_keys(model, role))
    view = store.cached_view
    if view is not None:
        for node_id in view.candidates(model, role):
            node_hash, leases, _ = store.keys.node_keys(node_id)
            keys.extend((node_hash, leases))
    return keys


async def enqueue(
    store: Store,
    *,
    model: str,
    role: int,
    member: str,
    priority: Priority,
    fair_key: str,
    share: int,
    max_queue: int,
) -> Enqueued:
    """Queue the request whose lease member is ``member``, then admit what has room."""
    if isinstance(share, bool) or not isinstance(share, int) or not 1 <= share <= MAX_SHARE:
        raise InvalidInput(f"share must be a whole number from 1 to {MAX_SHARE}")
    keys = [store.keys.queue_seq, *_queue_keys(store, model, role)]
    args = [
        member,
        int(priority) + 1,
        fair_key,
        share,
        store.settings.lease_ms,
        max(0, max_queue),
        model,
        role,
        store.keys.admit_channel,
        store.settings.priority_reserve,
    ]
    status, ticket, node_id, depth, *_grants = await store.run_script(scripts.ENQUEUE, keys, args)
    return Enqueued(str(status), str(ticket), str(node_id), int(depth))


async def admit(store: Store, model: str, role: int, tickets: Sequence[str] = ()) -> QueueReport:
    """Admit the queue's head as far as the nodes have room; tell where ``tickets`` stand."""
    args = [
        store.settings.lease_ms,
        model,
        role,
        store.keys.admit_channel,
        store.settings.priority_reserve,
        *tickets,
    ]
    reply = await store.run_script(scripts.ADMIT, _queue_keys(store, model, role), args)
    depth, count = int(reply[0]), int(reply[1])
    pairs = reply[2 : 2 + 2 * count]
    admitted = tuple(Admitted(str(pairs[i]), str(pairs[i + 1])) for i in range(0, len(pairs), 2))
    return QueueReport(depth, admitted, tuple(str(s) for s in reply[2 + 2 * count :]))


async def dequeue(store: Store, model: str, role: int, ticket: str) -> tuple[str, str]:
    """Take ``ticket`` out of the queue: ("removed", ""), ("admitted", node id) when it was
    admitted first (its lease is held: use or release it), or ("gone", "")."""
    status, node_id = await store.run_script(
        scripts.DEQUEUE, _queue_keys(store, model, role), [ticket]
    )
    return str(status), str(node_id)


async def depths(store: Store, nodes: Sequence[Node]) -> dict[str, tuple[int, int, int]]:
    """Requests waiting in the fleet's queues of these nodes' models, per model: (high,
    normal, low), summed over the roles the nodes serve (expired tickets count until an
    admission pass drops them)."""
    queues = {(model, 0) for node in nodes for model in node.models}
    queues |= {(m, int(n.role)) for n in nodes if n.role is not Role.HYBRID for m in n.models}
    out: dict[str, tuple[int, int, int]] = {}
    async with store.guard():
        for model, role in sorted(queues):
            high, normal, low, _, _ = store.keys.queue_keys(model, role)
            counts = [int(await store.client.zcard(key)) for key in (high, normal, low)]
            was = out.get(model, (0, 0, 0))
            out[model] = (was[0] + counts[0], was[1] + counts[1], was[2] + counts[2])
    return out


async def admissions(store: Store, replica: str) -> AsyncIterator[Admitted]:
    """The admissions of this replica's tickets, as the admitting scripts publish them.

    Runs until cancelled; raises :class:`~shared_state.errors.StoreUnavailable` when the
    store goes away (the caller subscribes again later and asks for what it missed)."""
    pubsub = store.client.pubsub()
    try:
        async with store.guard():
            await pubsub.subscribe(store.keys.admit_channel + replica)
        while True:
            async with store.guard():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None:
                continue
            member, _, node_id = str(message["data"]).partition(" ")
            if node_id:
                yield Admitted(member, node_id)
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
