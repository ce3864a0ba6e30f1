"""Client API key records as stored: the digest that is a key's only stored form, the limit
and admission arguments the key scripts take, and the decoding of a stored record (a malformed
one reads as no limits and default admission settings, never as an error on the request
path)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from .errors import InvalidInput
from .model import ApiKey, KeyAdmission, Priority

PRIORITIES = {p.name.lower(): p for p in Priority}  # "high", "normal", "low"
UNCAPPED = "any"  # a max_priority argument that removes the cap
MAX_SHARE = 1000


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


def priority_arg(name: str, value: Priority | str | None, *, uncapped: bool = False) -> str:
    """A priority as key_add.lua takes it: "" unchanged, else its name; with ``uncapped``
    (``max_priority``) also "any", which removes the cap."""
    if value is None:
        return ""
    if isinstance(value, Priority):
        return value.name.lower()
    text = value.strip().lower() if isinstance(value, str) else ""
    if text in PRIORITIES or (uncapped and text == UNCAPPED):
        return text
    allowed = "high, normal, low or any" if uncapped else "high, normal or low"
    raise InvalidInput(f"{name} must be {allowed}, not {value!r}")


def share_arg(value: int | None) -> str:
    """A key's fair share as key_add.lua takes it: "" unchanged, else the number (1: the
    default, stored as absent)."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHARE:
        raise InvalidInput(f"share must be a whole number from 1 to {MAX_SHARE}")
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
    admission = key_admission(meta) or KeyAdmission()
    return ApiKey(
        str(meta["name"]),
        digest[:12],
        int(meta["created_ms"]),
        rpm,
        concurrency,
        priority=admission.priority,
        max_priority=admission.max_priority,
        share=admission.share,
    )


def key_limits(meta: Any) -> tuple[int, int]:
    """(rpm, concurrency) of a stored key's record, 0 for unlimited; malformed reads as none."""
    try:
        return max(int(meta.get("rpm") or 0), 0), max(int(meta.get("concurrency") or 0), 0)
    except (AttributeError, TypeError, ValueError):
        return 0, 0


def key_admission(meta: Any) -> KeyAdmission | None:
    """The admission settings of a stored key's record; ``None`` when they are the defaults
    (normal priority, uncapped, share 1). A malformed field reads as its default."""
    if not isinstance(meta, dict):
        return None
    priority = _priority(meta.get("priority"))
    share = meta.get("share")
    if isinstance(share, bool) or not isinstance(share, int) or not 1 <= share <= MAX_SHARE:
        share = 1
    cap = _priority(meta.get("max_priority"))
    admission = KeyAdmission(Priority.NORMAL if priority is None else priority, cap, share)
    return None if admission == KeyAdmission() else admission


def _priority(value: object) -> Priority | None:
    return PRIORITIES.get(value) if isinstance(value, str) else None
