"""Per-key limits: requests per minute and requests in flight of one client API key, counted
across every replica in Redis (``key_limit.lua``, ``key_limit_release.lua``).

Limits live with the key (``fleetgate keys add NAME --rpm N --concurrency N``); every replica
learns them with its cached registry, so a request with an unlimited key never calls Redis for
limits. A limited request runs one script to be admitted and, with a concurrency limit, one to
free its slot when it ends. The slot is a lease with the gateway's lease time that is never
renewed: a request that runs longer than the lease time stops counting towards concurrency,
and a replica that crashes cannot hold slots for longer than that.
"""

from __future__ import annotations

import logging
import secrets

import msgspec

from . import scripts
from .errors import StoreUnavailable
from .store import Store

log = logging.getLogger("fleetgate.limits")

RPM = "rpm"
CONCURRENCY = "concurrency"


class LimitDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Whether one request of a key was admitted, and if not, by which limit and until when."""

    allowed: bool
    limit: str = ""  # the limit that refused: "rpm" or "concurrency"; "" when admitted
    retry_after_s: float = 0.0  # when a retry may succeed; 0 when admitted
    in_flight: int = 0  # the key's requests in flight (counted with a concurrency limit only)
    leased: bool = False  # the request holds a concurrency slot: release it when it ends
    member: str = ""  # the slot's lease member
    rpm: int = 0  # the key's limits the decision applied; 0: unlimited
    concurrency: int = 0


def cached_limits(store: Store, digest: str) -> tuple[int, int] | None:
    """(rpm, concurrency) of a stored key from the replica's cached registry; ``None`` when
    the key has no limits or the cache does not know the key."""
    view = store.cached_view
    return view.registry.key_limits.get(digest) if view is not None else None


async def limits_of(store: Store, digest: str) -> tuple[int, int] | None:
    """(rpm, concurrency) of the stored key with this hex digest, ``None`` when unlimited.

    Free for a key in the cached registry. A key the cache does not know yet (it was added
    after the last refresh, and authenticated through the store) re-reads the registry once.
    """
    view = store.cached_view
    if view is None or digest not in view.key_digests:
        view = await store.refresh_latest()
    return view.registry.key_limits.get(digest)


async def acquire(
    store: Store,
    digest: str,
    rpm: int,
    concurrency: int,
    member: str,
    lease_ms: int | None = None,
) -> LimitDecision:
    """Admit one request of the key ``digest`` under ``rpm`` requests per minute and
    ``concurrency`` requests in flight (0: unlimited), in one atomic script.

    An admitted request counts against both limits; with a concurrency limit it holds a slot
    leased to ``member`` for ``lease_ms`` (default: the store's lease time), freed by
    :func:`release`. A refused request counts against neither.
    """
    lease = store.settings.lease_ms if lease_ms is None else lease_ms
    keys = [store.keys.key_rate(digest), store.keys.key_leases(digest)]
    allowed, limit, retry_ms, in_flight, leased = await store.run_script(
        scripts.KEY_LIMIT, keys, [member, int(rpm), int(concurrency), int(lease)]
    )
    return LimitDecision(
        allowed=bool(int(allowed)),
        limit=str(limit),
        retry_after_s=int(retry_ms) / 1000,
        in_flight=int(in_flight),
        leased=bool(int(leased)),
        member=member if int(leased) else "",
        rpm=int(rpm),
        concurrency=int(concurrency),
    )


async def release(store: Store, digest: str, member: str) -> bool:
    """Free the concurrency slot ``member`` holds; False when it had expired or was freed."""
    freed = await store.run_script(
        scripts.KEY_LIMIT_RELEASE, [store.keys.key_leases(digest)], [member]
    )
    return bool(int(freed))


# -- the gateway's use: fail open, never raise --------------------------------------------

_failing = False


async def admit(store: Store, digest: str, replica: str, request_id: str) -> LimitDecision | None:
    """Check one request authenticated by the stored key ``digest``.

    ``None`` when the key has no limits (no Redis call for a cached key) or when the store
    cannot be reached: limits fail open, as routing does, with one warning per outage.
    """
    global _failing
    try:
        limits = await limits_of(store, digest)
        if limits is None:
            return None
        member = f"{replica}:{request_id}:{secrets.token_hex(4)}"
        decision = await acquire(store, digest, limits[0], limits[1], member)
    except StoreUnavailable as exc:
        if not _failing:
            _failing = True
            log.warning("store unreachable: per-key limits are not enforced (%s)", exc)
        return None
    if _failing:
        _failing = False
        log.warning("store reachable again: per-key limits are enforced")
    return decision


async def dismiss(store: Store, digest: str, decision: LimitDecision) -> None:
    """Free the slot an admitted request held; never raises (an unfreed slot expires)."""
    if not decision.leased:
        return
    try:
        await release(store, digest, decision.member)
    except StoreUnavailable:
        pass
    except Exception:
        log.exception("releasing the concurrency slot %s failed", decision.member)
