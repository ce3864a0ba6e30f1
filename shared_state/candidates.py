"""Which nodes a pick scores: the registry view's fitting nodes, ordered or cut so that the cost
of a pick stays flat as the fleet grows (pure: no I/O; :mod:`.store` runs the pick)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from .model import Strategy
from .registry import RegistryView

# Strategies whose state spans every candidate: never sampled.
FULL_SCAN = frozenset({Strategy.ROUND_ROBIN, Strategy.WEIGHTED_ROUND_ROBIN})


@dataclass(frozen=True, slots=True)
class PickRequest:
    """One pick's arguments, as :meth:`Store.pick` validated them."""

    model: str
    strategy: Strategy
    member: str
    role: int
    exclude: tuple[str, ...]
    seed: int | None
    session_key: str | None
    blocks: tuple[str, ...] = ()  # cache_aware: the prompt's chain of block hashes
    priority: int = 1  # the request's place in the fleet's queue: 0 high, 1 normal, 2 low
    only: str | None = None  # the one node that may take it (it holds the request's state)


def rendezvous(key: bytes, node_id: str) -> int:
    """The node's rank for ``key`` (highest first): the same on every replica."""
    return int.from_bytes(hashlib.blake2b(key + b"\0" + node_id.encode(), digest_size=8).digest())


def candidates(
    view: RegistryView, request: PickRequest, limit: int, sample: int, rng: random.Random
) -> list[str]:
    """The node ids passed to the pick script: all of them up to ``limit``; past it a random
    ``sample``, or the first ``limit`` in a rendezvous order where the pick needs one."""
    found = view.candidates(request.model, request.role, request.exclude)
    if request.only is not None:
        return [request.only] if request.only in found else []
    strategy = request.strategy
    if strategy is Strategy.SESSION_AFFINITY:
        # Rendezvous order of the session key: the same on every replica, and removing a
        # node moves only the keys that ranked it first.
        key = (request.session_key or "").encode()
        found.sort(key=lambda node_id: rendezvous(key, node_id), reverse=True)
        return found[:limit]
    if len(found) <= limit or strategy in FULL_SCAN:
        return found
    if strategy is Strategy.CACHE_AWARE and request.blocks:
        # The first block's rendezvous order: every request on this prefix sees the same
        # nodes, so the nodes holding it are among them however large the fleet.
        key = request.blocks[0].encode()
        found.sort(key=lambda node_id: rendezvous(key, node_id), reverse=True)
        return found[:limit]
    # Past the limit a random sample keeps the script's cost flat in the fleet size.
    return rng.sample(found, sample)
