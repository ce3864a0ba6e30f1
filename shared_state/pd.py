"""Prefill/decode (DistServe) state shared by every replica and the health-checker.

Three things live in Redis under the fleet's hash tag (docs/state.md):

- **connected pairs** (``pd:pairs``): a (prefill, decode) pair is connected once for the whole
  fleet. A per-pair lock (``pd:lock:<p>|<d>``, ``SET NX PX``) lets one process connect it while
  the others wait for it; a restarted replica finds its pairs already connected.
- **prefill sessions in migration** (``pd:sessions`` + ``pd:deadlines``): every DistServe request
  gets a fleet-wide unique integer session id (``INCR``) and a record naming its prefill node,
  its decode node once chosen, and the replica that owns it. The owner renews the deadline like
  a lease. Whoever *removes* a record (the owner when the request ends, a sweep when the owner
  died, a node removal, ``/distserve/gc``) is the one that frees the session on its prefill
  node: removal is atomic in Lua, so a session is freed once.
- the session id counter (``session_ids``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import msgspec

from . import scripts
from .store import Store


class PDSession(msgspec.Struct, frozen=True):
    """A prefill session recorded in the shared state."""

    session_id: int
    prefill: str  # node id (its URL)
    decode: str  # node id, "" until a decode node takes the session
    replica: str  # the replica that owns the request


def pair_key(prefill: str, decode: str) -> str:
    return f"{prefill} {decode}"


def _split_pair(field: str) -> tuple[str, str]:
    prefill, _, decode = field.partition(" ")
    return prefill, decode


def _sessions(flat: list[str]) -> list[PDSession]:
    """Sessions from a flat ``[id, "prefill decode replica", ...]`` reply (clients decode text)."""
    out: list[PDSession] = []
    for i in range(0, len(flat), 2):
        prefill, decode, replica = [*flat[i + 1].split(" "), "", "", ""][:3]
        out.append(PDSession(int(flat[i]), prefill, "" if decode == "-" else decode, replica))
    return out


class PDState:
    """The DistServe operations on the shared state of one :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys

    @property
    def _lease_ms(self) -> int:
        return self.store.settings.lease_ms

    # -- sessions ---------------------------------------------------------------------

    async def open_session(self, prefill: str, replica: str) -> int:
        """A new unique session id, recorded as prefilling on ``prefill`` for ``replica``."""
        k = self.keys
        sid = await self.store.run_script(
            scripts.PD_OPEN,
            [k.session_ids, k.pd_sessions, k.pd_deadlines],
            [prefill, replica, self._lease_ms],
        )
        return int(sid)

    async def shelve(self, session_id: int, decode: str) -> bool | None:
        """Hand the session to ``decode``: True when the pair is connected, False when it is
        not yet, None when the session is gone (taken by a sweep or a node removal)."""
        k = self.keys
        result = int(
            await self.store.run_script(
                scripts.PD_SHELVE,
                [k.pd_sessions, k.pd_deadlines, k.pd_pairs],
                [session_id, decode, self._lease_ms],
            )
        )
        return None if result < 0 else bool(result)

    async def close(self, *session_ids: int) -> list[PDSession]:
        """Remove the records; returns those this call removed (and must free, if anyone)."""
        if not session_ids:
            return []
        k = self.keys
        flat = await self.store.run_script(
            scripts.PD_CLOSE, [k.pd_sessions, k.pd_deadlines], list(session_ids)
        )
        return _sessions(list(flat))

    async def renew(self, session_ids: Iterable[int]) -> int:
        ids = list(session_ids)
        if not ids:
            return 0
        return int(
            await self.store.run_script(
                scripts.PD_RENEW, [self.keys.pd_deadlines], [self._lease_ms, *ids]
            )
        )

    async def take_expired(self, limit: int = 1000) -> list[PDSession]:
        """Sessions whose owner stopped renewing them; the caller must free them."""
        k = self.keys
        flat = await self.store.run_script(
            scripts.PD_EXPIRE, [k.pd_sessions, k.pd_deadlines], [limit]
        )
        return _sessions(list(flat))

    async def sessions(self) -> list[PDSession]:
        raw = await self.store.read_hash(self.keys.pd_sessions)
        flat: list[str] = []
        for sid, record in raw.items():
            flat += [sid, record]
        return sorted(_sessions(flat), key=lambda s: s.session_id)

    # -- pairs ------------------------------------------------------------------------

    async def pairs(self) -> dict[tuple[str, str], int]:
        """Connected pairs, with the ms time each was connected."""
        raw = await self.store.read_hash(self.keys.pd_pairs)
        out: dict[tuple[str, str], int] = {}
        for field, value in raw.items():
            out[_split_pair(field)] = int(value)
        return out

    async def is_connected(self, prefill: str, decode: str) -> bool:
        return await self.store.hash_has(self.keys.pd_pairs, pair_key(prefill, decode))

    async def try_lock(self, prefill: str, decode: str, ttl_ms: int) -> str | None:
        """Take the pair's connect lock: its token; "" when the pair is connected already;
        None when another process holds the lock."""
        token = secrets.token_hex(8)
        pair = pair_key(prefill, decode)
        k = self.keys
        result = int(
            await self.store.run_script(
                scripts.PD_LOCK, [k.pd_pairs, k.pd_lock(pair)], [pair, token, ttl_ms]
            )
        )
        return {1: "", 2: token}.get(result)

    async def mark_connected(self, prefill: str, decode: str, token: str) -> bool:
        pair = pair_key(prefill, decode)
        k = self.keys
        result = await self.store.run_script(
            scripts.PD_CONNECTED, [k.pd_pairs, k.pd_lock(pair)], [pair, token]
        )
        return bool(int(result))

    async def unlock(self, prefill: str, decode: str, token: str) -> None:
        key = self.keys.pd_lock(pair_key(prefill, decode))
        await self.store.run_script(scripts.PD_UNLOCK, [key], [token])

    async def drop_node(self, node_id: str) -> tuple[list[tuple[str, str]], list[PDSession]]:
        """Forget the pairs and take the sessions involving a node that goes away."""
        k = self.keys
        pairs_raw, sessions_raw = await self.store.run_script(
            scripts.PD_DROP, [k.pd_pairs, k.pd_sessions, k.pd_deadlines], [node_id]
        )
        return [_split_pair(field) for field in pairs_raw], _sessions(list(sessions_raw))
