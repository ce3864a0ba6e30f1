"""Client API key records as stored: the digest that is a key's only stored form, the limit
arguments the key scripts take, and the decoding of a stored record (a malformed one reads as
no limits, never as an error on the request path)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from .errors import InvalidInput
from .model import ApiKey


def key_digest(key: str) -> str:
    """The hex SHA-256 of a client key: the only form in which keys are stored."""
    return hashlib.sha256(key.encode()).hexdigest()


_MAX_LIMIT = 1_000_000  # GCRA keeps ms to 3 decimals: enough up to this rpm


def limit_arg(name: str, value: int | None) -> str:
    """A key limit as key_add.lua takes it: "" unchanged, "0" unlimited, else the number."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_LIMIT:
        raise InvalidInput(f"{name} must be a whole number from 0 (unlimited) to {_MAX_LIMIT}")
    return str(value)


def stored_json(raw: str) -> Any:
    """A stored JSON value; ``None`` when it is malformed."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def api_key_record(digest: str, meta: Any) -> ApiKey:
    """A stored key's public view: its record, and the first 12 hex digits of its digest."""
    rpm, concurrency = key_limits(meta)
    return ApiKey(str(meta["name"]), digest[:12], int(meta["created_ms"]), rpm, concurrency)


def key_limits(meta: Any) -> tuple[int, int]:
    """(rpm, concurrency) of a stored key's record, 0 for unlimited; malformed reads as none."""
    try:
        return max(int(meta.get("rpm") or 0), 0), max(int(meta.get("concurrency") or 0), 0)
    except (AttributeError, TypeError, ValueError):
        return 0, 0
