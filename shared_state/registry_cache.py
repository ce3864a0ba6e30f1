"""A process's cached registry view, and what it does when the store lost the registry.

The view is replaced when the store's epoch or generation moves. A store whose epoch went
backwards (or that lost the generation the cache was read under) was emptied, restarted empty
or failed over to a replica that lagged: it is never trusted less than the cache. A gateway
replica (:meth:`RegistryCache.restore_as`) then restores its last registry into the store with
``registry_restore.lua``, which writes only into a store that is behind, once; other users of
the cache adopt what the store holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import orjson

from . import scripts
from .errors import StateError
from .model import Registry, Restore, RestoreRecord
from .registry import RegistryView, registry_fields
from .schema import KeySchema

log = logging.getLogger("fleetgate.registry")

RESTORE_RETRY_S = 0.5  # after a failed restore: the cached view serves until the next try


class RegistrySource(Protocol):
    """What the cache reads the registry from and restores it into (the :class:`Store`)."""

    @property
    def keys(self) -> KeySchema: ...

    async def registry(self) -> Registry: ...

    async def registry_stamp(self) -> tuple[int, str]: ...

    async def run_script(self, script: scripts.Script, keys: list[str], args: list[Any]) -> Any: ...

    async def read_hash(self, key: str) -> dict[str, str]: ...


async def restore_registry(source: RegistrySource, snapshot: Registry, replica: str) -> Restore:
    """Write ``snapshot`` back into a store behind it (registry_restore.lua), once; returns
    what the script did: restored, stamped (given a generation) or current (nothing written)."""
    schema = source.keys
    keys = [
        schema.nodes,
        schema.epoch,
        schema.api_keys,
        schema.keys_required,
        schema.restore_record,
        *(schema.node(n.id) for n in snapshot.nodes),
    ]
    args: list[Any] = [
        snapshot.epoch,
        snapshot.generation,
        f"{replica}:{uuid.uuid4().hex}",
        replica,
        "1" if snapshot.keys_required else "0",
        len(snapshot.key_entries),
        *(v for entry in snapshot.key_entries.items() for v in entry),
        *(orjson.dumps(registry_fields(n)).decode() for n in snapshot.nodes),
    ]
    status, epoch, nodes, restored_keys = await source.run_script(
        scripts.REGISTRY_RESTORE, keys, args
    )
    return Restore(str(status), int(epoch), int(nodes), int(restored_keys))


async def read_restore_record(source: RegistrySource) -> RestoreRecord | None:
    """The registry's generation and last restore; None when the store has no record."""
    fields = await source.read_hash(source.keys.restore_record)
    if not fields.get("generation"):
        return None
    return msgspec.convert(fields, RestoreRecord, strict=False)


@dataclass(slots=True)
class RegistryLoss:
    """A store found behind the cached registry, and what became of it."""

    cached_epoch: int
    found_epoch: int
    detected_ms: int  # this process's wall clock
    nodes: int  # the cached registry's nodes and keys, the ones to restore
    keys: int
    restored: bool = False
    by_this_replica: bool = False
    error: str = ""

    def describe(self) -> str:
        """One line for logs and /ready."""
        lost = (
            f"the store lost its registry (epoch {self.found_epoch}, this replica had "
            f"{self.cached_epoch} with {self.nodes} nodes and {self.keys} keys)"
        )
        if self.by_this_replica:
            return f"{lost}; this replica restored it"
        if self.restored:
            return f"{lost}; another replica restored it"
        if self.error:
            return f"{lost}; not restored yet: {self.error}"
        return f"{lost}; not restored"


def is_behind(found: Registry, cached: Registry) -> bool:
    """Whether the store's registry is behind the cached one (as registry_restore.lua tells):
    its epoch went backwards, or the generation the cache was read under is gone."""
    return found.epoch < cached.epoch or (bool(cached.generation) and not found.generation)


def _nothing() -> None:
    pass


class RegistryCache:
    """The cached :class:`RegistryView` of one process, refreshed on demand."""

    def __init__(self, source: RegistrySource) -> None:
        self._source = source
        self._view: RegistryView | None = None
        self._lock = asyncio.Lock()
        self._replica: str | None = None
        self._on_restore: Callable[[], None] = _nothing
        self._retry_at = 0.0
        self.loss: RegistryLoss | None = None  # the store is behind and not restored yet
        self.last_loss: RegistryLoss | None = None
        self.restores = 0  # registries this process restored

    def restore_as(self, replica: str, on_restore: Callable[[], None] = _nothing) -> None:
        """Restore the cached registry, as ``replica``, into a store found behind it, calling
        ``on_restore`` each time this process did."""
        self._replica = replica
        self._on_restore = on_restore

    @property
    def view(self) -> RegistryView | None:
        return self._view

    async def refresh(
        self, seen_epoch: int | None = None, seen_generation: str | None = None
    ) -> RegistryView:
        """The view of the store's registry; kept without a read when the store is at
        ``seen_epoch`` (and ``seen_generation``, when given) as the view is."""
        async with self._lock:
            view = self._view
            if (
                view is not None
                and seen_epoch == view.epoch
                and seen_generation in (None, view.generation)
            ):
                return view
            if view is not None and self.loss is not None and time.monotonic() < self._retry_at:
                return view
            found = await self._source.registry()
            if view is not None and is_behind(found, view.registry):
                if await self._recover(view.registry, found):
                    return view
                found = await self._source.registry()
            elif self.loss is not None:  # another replica restored it meanwhile
                self.loss.restored, self.loss.error = True, ""
                self.loss, self.last_loss = None, self.loss
            elif self._replica is not None and not found.generation:
                found = await self._stamp(found)
            self._view = RegistryView(found)
            return self._view

    async def refresh_latest(self) -> RegistryView:
        """The view at the store's current epoch and generation: re-read only if they moved."""
        epoch, generation = await self._source.registry_stamp()
        return await self.refresh(epoch, generation)

    async def _recover(self, snapshot: Registry, found: Registry) -> bool:
        """Restore ``snapshot`` into the store found behind it; True to keep the cached view
        (the restore failed and will be tried again)."""
        loss = self.loss
        if loss is None:
            loss = RegistryLoss(
                cached_epoch=snapshot.epoch,
                found_epoch=found.epoch,
                detected_ms=int(time.time() * 1000),
                nodes=len(snapshot.nodes),
                keys=len(snapshot.key_entries),
            )
            self.loss = loss
            log.warning("%s", loss.describe())
        if self._replica is None:
            # Not a gateway replica: it keeps no registry of its own, the store is the truth.
            self.loss, self.last_loss = None, loss
            return False
        try:
            result = await restore_registry(self._source, snapshot, self._replica)
        except StateError as exc:
            loss.error = str(exc)
            self._retry_at = time.monotonic() + RESTORE_RETRY_S
            return True
        loss.error = ""
        loss.restored = True
        loss.by_this_replica = result.status == "restored"
        if loss.by_this_replica:
            self.restores += 1
            self._on_restore()
        log.warning("%s (epoch now %d)", loss.describe(), result.epoch)
        self.loss, self.last_loss = None, loss
        return False

    async def _stamp(self, found: Registry) -> Registry:
        """Give a registry without a generation one, so that losing it can be told later."""
        if time.monotonic() < self._retry_at:
            return found
        assert self._replica is not None
        try:
            result = await restore_registry(self._source, found, self._replica)
        except StateError as exc:
            log.warning("registry generation not written: %s", exc)
            self._retry_at = time.monotonic() + RESTORE_RETRY_S
            return found
        if result.status == "restored":  # the store fell behind in between: it is back
            self.restores += 1
            self._on_restore()
        return await self._source.registry()
