"""Who may call what: client keys for the OpenAI API, the admin key for /nodes/*, and the
networks allowed to self-register nodes without a key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable

from .errors import Forbidden, Unauthorized
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
    """Holds only digests of the keys; comparisons take constant time."""

    def __init__(
        self,
        client_keys: Iterable[str],
        admin_key: str | None,
        register_allow: Iterable[IPNetwork],
    ) -> None:
        self._client = frozenset(digest(k) for k in client_keys)
        self._admin = digest(admin_key) if admin_key else None
        self._allow = tuple(register_allow)

    @property
    def open(self) -> bool:
        return not self._client

    def _is_admin_key(self, token: str | None) -> bool:
        return (
            token is not None
            and self._admin is not None
            and hmac.compare_digest(digest(token), self._admin)
        )

    def check_client(self, headers: Headers) -> None:
        """Allow an OpenAI API call, or raise :class:`Unauthorized`."""
        if not self._client:
            return
        token = bearer_token(headers)
        if token is None:
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        if digest(token) not in self._client and not self._is_admin_key(token):
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

    def check_register(self, headers: Headers, client_host: str | None) -> None:
        """Allow /nodes/add: an admin, or a node inside a --register-allow network."""
        if client_host and self._allow:
            try:
                address = ipaddress.ip_address(client_host)
            except ValueError:
                address = None
            if address is not None and any(address in net for net in self._allow):
                return
        self.check_admin(headers, client_host)

    def check_reader(self, headers: Headers, client_host: str | None) -> None:
        """Allow reading fleet status: any valid client key, or an admin."""
        if self._is_admin_key(bearer_token(headers)):
            return
        if self._client:
            self.check_client(headers)
            return
        if self._admin is not None and not is_loopback(client_host):
            raise Unauthorized("node status needs a key")
