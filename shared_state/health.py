"""Health-checker state: the leader lease with its fencing token, fenced health reports,
the transition log, and housekeeping of expired leases and live replicas.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from . import scripts
from .errors import Fenced, InvalidInput
from .model import Event, HealthReport, ProbeResult, Sweep
from .registry import encode_models, normalize_url, validate_models
from .store import Store

EVENTS_KEPT = 1000
_decode_event = msgspec.json.Decoder(Event).decode


class HealthLedger:
    """The shared-state operations of the health-checker, over a :class:`Store`."""

    def __init__(self, store: Store, checker_id: str) -> None:
        if not checker_id or " " in checker_id:
            raise ValueError("checker id must be non-empty, without spaces")
        self.store = store
        self.keys = store.keys
        self.checker_id = checker_id

    async def lead(self, lease_ms: int) -> tuple[int, str]:
        """Take or keep the leader lease: (token, holder); token 0 when another leads."""
        token, holder = await self.store.run_script(
            scripts.LEADER, [self.keys.leader, self.keys.fence], [self.checker_id, lease_ms, "1"]
        )
        return int(token), str(holder)

    async def resign(self) -> None:
        await self.store.run_script(
            scripts.LEADER, [self.keys.leader, self.keys.fence], [self.checker_id, 1, "0"]
        )

    async def report(
        self,
        token: int,
        node_id: str,
        result: ProbeResult,
        *,
        fall: int,
        rise: int,
        deregister_after_ms: int,
        reason: str = "",
        models: Iterable[str] | None = None,
        kv_usage: float | None = None,
        running: int | None = None,
        waiting: int | None = None,
    ) -> HealthReport:
        """Record a node's probe findings; raises :class:`Fenced` if this checker lost the lead."""
        node_id = _stored_id(node_id)
        keys = [
            self.keys.leader,
            self.keys.node(node_id),
            self.keys.nodes,
            self.keys.epoch,
            self.keys.leases(node_id),
            self.keys.latencies(node_id),
            self.keys.ejected,
            self.keys.events,
            self.keys.prefix_blocks(node_id),
        ]
        args = [
            self.checker_id,
            token,
            node_id,
            ProbeResult(result).value,
            fall,
            rise,
            deregister_after_ms,
            reason[:300],
            encode_models(validate_models(models)) if models else "",
            "" if kv_usage is None else repr(float(kv_usage)),
            running or 0,
            waiting or 0,
            EVENTS_KEPT,
        ]
        status, state, changed = await self.store.run_script(scripts.HEALTH_REPORT, keys, args)
        if status == "fenced":
            raise Fenced(f"checker {self.checker_id} with token {token} no longer leads")
        return HealthReport(str(status), str(state), bool(changed))

    async def events(self, limit: int = 100) -> list[Event]:
        """The latest recorded transitions, newest first."""
        return await recent_events(self.store, limit)

    async def sweep(self, token: int, node_ids: Iterable[str], alive_ms: int) -> Sweep:
        """Remove expired leases of ``node_ids``; return the replicas that renewed recently."""
        keys = [self.keys.leader, self.keys.replicas, *(self.keys.leases(n) for n in node_ids)]
        args = [self.checker_id, token, alive_ms, alive_ms * 100]
        reply = await self.store.run_script(scripts.SWEEP, keys, args)
        if int(reply[0]) < 0:
            raise Fenced(f"checker {self.checker_id} with token {token} no longer leads")
        live = {str(reply[i]): int(float(reply[i + 1])) for i in range(1, len(reply), 2)}
        return Sweep(int(reply[0]), live)


async def recent_events(store: Store, limit: int) -> list[Event]:
    """The latest ``limit`` recorded transitions, newest first; an entry that is not an
    event (written by hand, say) is left out rather than hiding the others."""
    if limit < 1:
        raise InvalidInput("limit must be at least 1")
    events = []
    for item in await store.read_list(store.keys.events, limit):
        try:
            events.append(_decode_event(item))
        except msgspec.DecodeError:
            continue
    return events


async def checker_leader(store: Store) -> str | None:
    """The id of the health-checker holding the leader lease now; None when none does."""
    value = await store.read_value(store.keys.leader)
    if not value:
        return None
    return value.split(" ", 1)[0]


def _stored_id(node_id: str) -> str:
    """The node's id as its keys are named: normalized, or as stored when a script wrote an
    id that no longer normalizes, so that such a node can still be marked and removed."""
    try:
        return normalize_url(node_id)
    except InvalidInput:
        if not node_id:
            raise
        return node_id
