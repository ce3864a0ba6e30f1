"""Who may call what: client keys for the OpenAI API, the admin key for /nodes/*, and the
networks allowed to self-register nodes without a key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable

from shared_state import Store, StoreUnavailable

from .errors import Forbidden, StoreDown, Unauthorized
from .settings import IPNetwork

Headers = Iterable[tuple[bytes, bytes]]


def bearer_token(headers: Headers) -> str | None:
    """The key from ``Authorization: Bearer`` (or ``x-api-key``), if any."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value:
            return value.decode("latin-1").strip()
    return None


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Authenticator:
    """Holds only digests of the keys; comparisons take constant time.

    Client keys come from the command line and from the store (``fleetgate keys add``), whose
    digests every replica caches with the registry and re-reads when the epoch moves; a key
    missing from the cache is looked up in the store before it is refused, so a new key works
    on every replica at once.
    """

    def __init__(
        self,
        client_keys: Iterable[str],
        admin_key: str | None,
        register_allow: Iterable[IPNetwork],
        store: Store | None = None,
    ) -> None:
        self._client = frozenset(digest(k) for k in client_keys)
        self._admin = digest(admin_key) if admin_key else None
        self._allow = tuple(register_allow)
        self._store = store

    def _stored_digests(self) -> frozenset[str]:
        view = self._store.cached_view if self._store is not None else None
        return view.key_digests if view is not None else frozenset()

    def _keys_required(self) -> bool:
        """Keys are, or once were, stored: revoking the last one must not open the API."""
        view = self._store.cached_view if self._store is not None else None
        return view is not None and (view.registry.keys_required or bool(view.key_digests))

    @property
    def open(self) -> bool:
        """No key configured anywhere, ever (or opened again by ``fleetgate keys open``): the
        OpenAI API takes every caller."""
        return not self._client and not self._keys_required()

    async def _learn_keys(self, headers: Headers) -> None:
        """Read the registry when this replica never has: until it knows whether the store
        requires keys, the API is not open (a replica started while Redis was unreachable
        must not take every caller on a fleet whose keys are stored there). Raises
        :class:`StoreDown` for any caller but the admin while the store stays unreachable."""
        assert self._store is not None
        try:
            await self._store.refresh()
        except StoreUnavailable:
            if self._is_admin_key(bearer_token(headers)):
                return
            raise StoreDown(
                "cannot check the API key: the store has not answered since this gateway"
                " replica started"
            ) from None

    def _is_admin_key(self, token: str | None) -> bool:
        return (
            token is not None
            and self._admin is not None
            and hmac.compare_digest(digest(token), self._admin)
        )

    async def check_client(self, headers: Headers) -> str | None:
        """Allow an OpenAI API call, or raise :class:`Unauthorized`.

        Returns the hex digest of the stored key (``fleetgate keys add``) that authenticated
        the call, whose per-key limits apply; ``None`` for an open API, a ``--api-key`` key or
        the admin key, which have no limits.
        """
        if not self._client and self._store is not None and self._store.cached_view is None:
            await self._learn_keys(headers)
        if self.open:
            return None
        stored = self._stored_digests()
        token = bearer_token(headers)
        if token is None:
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        raw = digest(token)
        if raw in self._client or self._is_admin_key(token):
            return None
        hexed = raw.hex()
        if hexed in stored:
            return hexed
        if self._store is not None:
            try:
                if await self._store.key_exists(hexed):
                    return hexed
            except StoreUnavailable:
                pass  # fail closed for keys this replica has never seen
        raise Unauthorized("invalid API key")

    def check_admin(self, headers: Headers, client_host: str | None) -> None:
        """Allow a /nodes/* call: the admin key, or loopback when no admin key is set."""
        token = bearer_token(headers)
        if self._admin is None:
            if is_loopback(client_host):
                return
            raise Forbidden("node management is allowed from loopback only (no admin key set)")
        if token is None:
            raise Unauthorized("missing admin key: send Authorization: Bearer <admin key>")
        if not self._is_admin_key(token):
            raise Unauthorized("invalid admin key")

    def check_register(self, headers: Headers, client_host: str | None) -> bool:
        """Allow /nodes/add: True for an admin (full control), False for a caller inside a
        --register-allow network, who may only register itself (see nodes_api)."""
        if self._is_admin_key(bearer_token(headers)):
            return True
        if self._admin is None and is_loopback(client_host):
            return True
        if client_host and self._allow:
            try:
                address = ipaddress.ip_address(client_host)
            except ValueError:
                address = None
            if address is not None and any(address in net for net in self._allow):
                return False
        self.check_admin(headers, client_host)
        return True

    async def check_reader(self, headers: Headers, client_host: str | None) -> None:
        """Allow reading fleet status: any valid client key, or an admin."""
        if self._is_admin_key(bearer_token(headers)):
            return
        if not self.open:
            await self.check_client(headers)
            return
        if self._admin is not None and not is_loopback(client_host):
            raise Unauthorized("node status needs a key")
