"""The client API key store, kept as SHA-256 digests only: adding a key with its limits and
admission settings, changing them, revoking keys and opening the API again. :class:`Store`
inherits these methods; they issue no Redis command themselves but run the key scripts
(``key_add.lua``, ``key_revoke.lua``, ``key_open.lua``) through :meth:`Store.run_script`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from . import scripts
from .errors import InvalidInput, UnknownKey
from .key_records import api_key_record, key_digest, limit_arg, priority_arg, share_arg
from .model import ApiKey, Priority

if TYPE_CHECKING:
    from .schema import KeySchema


class KeyStore:
    """The client-key methods of :class:`Store` (which provides ``keys``, ``run_script`` and
    ``read_hash``)."""

    if TYPE_CHECKING:
        keys: KeySchema

        async def run_script(
            self, script: scripts.Script, keys: list[str], args: list[Any]
        ) -> Any: ...

        async def read_hash(self, key: str) -> dict[str, str]: ...

    async def add_key(
        self,
        name: str,
        key: str,
        *,
        rpm: int | None = None,
        concurrency: int | None = None,
        priority: Priority | str | None = None,
        max_priority: Priority | str | None = None,
        share: int | None = None,
    ) -> tuple[ApiKey, bool]:
        """Store a client key under a unique name; returns it and whether it is new.

        ``rpm`` (requests per minute) and ``concurrency`` (requests in flight) limit the key
        across all replicas; ``None`` leaves a stored key's limit as it is (a new key: none),
        0 removes it. ``priority``, ``max_priority`` and ``share`` are its admission settings
        (see :meth:`set_key_limits`), ``None`` leaving each as it is (a new key: the default).
        """
        name = name.strip() if isinstance(name, str) else ""
        if not name or len(name) > 100 or any(c.isspace() for c in name):
            raise InvalidInput("key name must be 1-100 characters without spaces")
        if not isinstance(key, str) or len(key) < 16 or any(c.isspace() for c in key):
            raise InvalidInput("an API key must be at least 16 characters without spaces")
        digest = key_digest(key)
        limits = [limit_arg("rpm", rpm), limit_arg("concurrency", concurrency)]
        admission = admission_args(priority, max_priority, share)
        status, _epoch, _digest, entry = await self.run_script(
            scripts.KEY_ADD, self._key_script_keys(), [digest, name, *limits, "add", *admission]
        )
        if status == "name_taken":
            raise InvalidInput(f"a different key is already named {name!r}: revoke it first")
        return api_key_record(digest, orjson.loads(entry)), status == "added"

    async def set_key_limits(
        self,
        name: str,
        *,
        rpm: int | None = None,
        concurrency: int | None = None,
        priority: Priority | str | None = None,
        max_priority: Priority | str | None = None,
        share: int | None = None,
    ) -> tuple[ApiKey, bool]:
        """Change the limits (0: unlimited) and admission settings of the key named ``name``,
        ``None`` leaving one unchanged; returns it and whether anything changed.
        :class:`UnknownKey` if there is none, :class:`InvalidInput` for a bad value.

        ``priority`` is that of its requests that ask for none (``"normal"`` by default),
        ``max_priority`` the highest they may ask for (``"any"`` removes the cap), each a name
        or a :class:`Priority`; ``share`` its weight in the fair share (1 to 1000, 1 by default).
        """
        limits = [limit_arg("rpm", rpm), limit_arg("concurrency", concurrency)]
        admission = admission_args(priority, max_priority, share)
        status, _epoch, digest, entry = await self.run_script(
            scripts.KEY_ADD, self._key_script_keys(), ["", name, *limits, "set", *admission]
        )
        if status == "unknown":
            raise UnknownKey(f"no API key named {name!r}")
        return api_key_record(str(digest), orjson.loads(entry)), status == "updated"

    async def revoke_key(self, name: str) -> None:
        """Remove the key named ``name`` (:class:`UnknownKey` if there is none)."""
        removed = await self.run_script(scripts.KEY_REVOKE, self._key_script_keys(), [name])
        if not int(removed):
            raise UnknownKey(f"no API key named {name!r}")

    async def open_keys(self) -> bool:
        """Let callers without a key use the OpenAI API again (none must be stored, else
        :class:`InvalidInput`); returns whether it was closed."""
        status, stored = await self.run_script(scripts.KEY_OPEN, self._key_script_keys(), [])
        if status == "keys_stored":
            raise InvalidInput(f"{int(stored)} API key(s) still stored: revoke them first")
        return bool(status == "opened")

    def _key_script_keys(self) -> list[str]:
        """KEYS of the key_add, key_revoke and key_open scripts."""
        return [self.keys.api_keys, self.keys.epoch, self.keys.keys_required]

    async def list_keys(self) -> list[ApiKey]:
        entries = await self.read_hash(self.keys.api_keys)
        out = [api_key_record(digest, orjson.loads(raw)) for digest, raw in entries.items()]
        return sorted(out, key=lambda k: (k.created_ms, k.name))


def admission_args(
    priority: Priority | str | None, max_priority: Priority | str | None, share: int | None
) -> list[str]:
    """ARGV[6..8] of key_add.lua: a key's admission settings, "" for each left unchanged."""
    return [
        priority_arg("priority", priority),
        priority_arg("max_priority", max_priority, uncapped=True),
        share_arg(share),
    ]
