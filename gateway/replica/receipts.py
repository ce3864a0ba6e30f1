"""The route receipts of this replica's latest requests, kept in memory for the status page.

A fixed-size ring: recording one is an append to a bounded deque, and the receipt text
(``x-fleetgate-route``) is only written out when the page asks, so the request path pays
next to nothing for it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple, Protocol

RECEIPTS_KEPT = 50


class Receipted(Protocol):
    """A route that can say why it was taken (``routing.Route``)."""

    def receipt(self, attempts: int) -> str: ...


class _Entry(NamedTuple):
    t_ms: int
    request_id: str
    path: str
    model: str | None
    node: str | None
    status: int
    ms: float
    attempts: int
    route: Receipted | None


class Receipts:
    """The last ``capacity`` requests this replica answered, oldest dropped first."""

    def __init__(self, capacity: int = RECEIPTS_KEPT) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._entries: deque[_Entry] = deque(maxlen=capacity)

    def record(
        self,
        *,
        t_ms: int,
        request_id: str,
        path: str,
        model: str | None,
        node: str | None,
        status: int,
        ms: float,
        attempts: int,
        route: Receipted | None,
    ) -> None:
        self._entries.append(
            _Entry(t_ms, request_id, path, model, node, status, ms, attempts, route)
        )

    def __len__(self) -> int:
        return len(self._entries)

    def latest(self, limit: int | None = None) -> list[dict[str, Any]]:
        """At most ``limit`` receipts (all kept when None), newest first, as JSON objects."""
        newest = list(reversed(self._entries))[: None if limit is None else max(0, limit)]
        return [
            {
                "t_ms": e.t_ms,
                "request_id": e.request_id,
                "path": e.path,
                "model": e.model,
                "node": e.node,
                "status": e.status,
                "ms": e.ms,
                "attempts": e.attempts,
                "route": None if e.route is None else e.route.receipt(e.attempts),
            }
            for e in newest
        ]
