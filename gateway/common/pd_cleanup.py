"""Clean-up of DistServe state that outlives a request: freeing prefill sessions on their
engines and disconnecting the pairs of a node that left.

Shared by the gateway replica (its own sessions, ``/distserve/gc``, node removal) and the
health-checker (sessions of dead replicas, nodes removed outside the gateway): it reaches the
engines only through the ``Call`` it is given, so neither process's HTTP client is imported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from shared_state import Node
from shared_state.pd import PDSession, PDState

from .metrics import Counter

log = logging.getLogger("fleetgate.distserve")

# (node, path, JSON body or None for GET) -> (status, body); raises on transport failure.
ControlBody = Mapping[str, object] | None
Call = Callable[[Node, str, ControlBody], Awaitable[tuple[int, bytes]]]


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


def node_of(pd: PDState, node_id: str) -> Node:
    """The registered node, or a stand-in for one that left the registry (its id is its URL)."""
    view = pd.store.cached_view
    if view is not None and node_id in view.by_id:
        return view.by_id[node_id]
    return Node(id=node_id, url=node_id, models=())


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
