"""Encoding nodes to and from their Redis hash, validation, and a cached view of the registry."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from .errors import InvalidInput
from .model import Node, NodeState, Registry, Role

MODELS_SEPARATOR = "\n"
MAX_MODELS = 4096
MAX_MODEL_CHARS = 512
MAX_API_KEY_CHARS = 4096
MAX_INFLIGHT = 1_000_000
_HEADER_VALUE = re.compile(r"[\x21-\x7e]*")
_HOST = re.compile(r"[a-z0-9._\-]+|\[[0-9a-f:.]+\]|[0-9a-f:.]+")


def normalize_url(url: object) -> str:
    """Return the canonical form of a node URL (its id), or raise :class:`InvalidInput`."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput("node url must be a non-empty string")
    text = url.strip()
    if any(c.isspace() for c in text):
        raise InvalidInput(f"node url {text!r} contains whitespace")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"node url {text!r} is malformed: {exc}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise InvalidInput(f"node url {text!r} must be http(s)://host[:port]")
    if not _HEADER_VALUE.fullmatch(parts.path):
        raise InvalidInput(f"node url {text!r} has control characters in its path")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidInput(f"node url {text!r} must not carry credentials, query or fragment")
    host = parts.hostname.lower()
    if not _HOST.fullmatch(host):
        # Every HTTP client of every process must reach it: ASCII names (punycode) and IPs.
        raise InvalidInput(f"node url {text!r} must name its host in ASCII (punycode) or by IP")
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def model_ids(listing: object) -> list[str]:
    """The model names of an OpenAI ``/v1/models`` answer (empty when it lists none)."""
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return []
    ids = [m.get("id") for m in data if isinstance(m, dict)]
    return [m for m in ids if isinstance(m, str) and m]


def validate_models(models: Iterable[object]) -> tuple[str, ...]:
    """The node's model names, deduplicated in order; at most ``MAX_MODELS`` of at most
    ``MAX_MODEL_CHARS`` characters each (a registry is read whole by every replica)."""
    out: dict[str, None] = {}  # a dict, not a list: deduplicating stays linear
    for m in models:
        if not isinstance(m, str) or not m.strip() or MODELS_SEPARATOR in m:
            raise InvalidInput(f"model name {m!r:.80} must be a non-empty single-line string")
        if len(m) > MAX_MODEL_CHARS:
            raise InvalidInput(f"model name {m[:40]!r}... is over {MAX_MODEL_CHARS} characters")
        out[m] = None
        if len(out) > MAX_MODELS:
            raise InvalidInput(f"a node may serve at most {MAX_MODELS} models")
    if not out:
        raise InvalidInput("a node needs at least one model")
    return tuple(out)


def validate_api_key(key: object) -> str:
    """A node's API key as the gateway may send it in a header: visible ASCII only, so that
    no CR, LF or other control character can reach an upstream request ("" means none)."""
    if not isinstance(key, str):
        raise InvalidInput("api_key must be a string")
    if len(key) > MAX_API_KEY_CHARS or not _HEADER_VALUE.fullmatch(key):
        raise InvalidInput(
            f"api_key must be at most {MAX_API_KEY_CHARS} visible ASCII characters "
            "(no spaces, control characters or line breaks)"
        )
    return key


def validate_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{name} must be a number")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise InvalidInput(f"{name} must be a positive number")
    return number


def validate_max_inflight(value: object) -> int:
    """A node's capacity: the requests it runs at once at most, a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INFLIGHT:
        raise InvalidInput(f"max_inflight must be an integer from 1 to {MAX_INFLIGHT}")
    return value


def validate_role(role: object) -> Role:
    if isinstance(role, int) and not isinstance(role, bool) and role in Role._value2member_map_:
        return Role(role)
    raise InvalidInput(f"role must be 1 (Hybrid), 2 (Prefill) or 3 (Decode), not {role!r}")


def encode_models(models: Iterable[str]) -> str:
    """Models as pick.lua searches them: each name between newlines."""
    return MODELS_SEPARATOR + MODELS_SEPARATOR.join(models) + MODELS_SEPARATOR


# Node hashes may be written by ops scripts without validation: a field that does not read
# as a number reads as absent, so that one such node cannot make the whole registry unreadable.


def _int(fields: Mapping[str, str], name: str, default: int = 0) -> int:
    number = _float(fields, name)
    return int(number) if number is not None else default


def _float(fields: Mapping[str, str], name: str) -> float | None:
    value = fields.get(name)
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is None or math.isfinite(number) else None


def decode_node(fields: Mapping[str, str]) -> Node:
    """Turn a node hash (as HGETALL returns it) into a :class:`Node`."""
    models = tuple(m for m in fields.get("models", "").split(MODELS_SEPARATOR) if m)
    state = fields.get("state", NodeState.ACTIVE.value)
    role = _int(fields, "role", Role.HYBRID)
    kv_running = _float(fields, "kv_running")
    kv_waiting = _float(fields, "kv_waiting")
    node_id = fields.get("id") or fields.get("url", "")  # a hash without its id: by its url
    return Node(
        id=node_id,
        url=fields.get("url", node_id),
        models=models,
        role=Role(role) if role in Role._value2member_map_ else Role.HYBRID,
        speed=_float(fields, "speed"),
        weight=_float(fields, "weight") or 1.0,
        api_key=fields.get("api_key") or None,
        insecure=fields.get("insecure") == "1",
        cache_blocks=_int(fields, "cache_blocks") or None,
        max_inflight=_int(fields, "max_inflight") or None,
        state=NodeState(state) if state in NodeState._value2member_map_ else NodeState.UNHEALTHY,
        state_reason=fields.get("state_reason", ""),
        state_since_ms=_int(fields, "state_since_ms"),
        added_ms=_int(fields, "added_ms"),
        ejected_until_ms=_int(fields, "ejected_until"),
        eject_count=_int(fields, "eject_count"),
        consecutive_failures=_int(fields, "consecutive_failures"),
        ok_total=_int(fields, "ok_total"),
        fail_total=_int(fields, "fail_total"),
        kv_usage=_float(fields, "kv_usage"),
        kv_running=int(kv_running) if kv_running is not None else None,
        kv_waiting=int(kv_waiting) if kv_waiting is not None else None,
        kv_ts_ms=_int(fields, "kv_ts") or None,
        probe_failures=_int(fields, "probe_failures"),
        probe_successes=_int(fields, "probe_successes"),
        last_probe_ms=_int(fields, "last_probe_ms"),
        probe_detail=fields.get("probe_detail", ""),
    )


def registry_fields(node: Node) -> dict[str, str]:
    """The fields of a node's hash that its registration and state give (not its runtime
    counters, health findings or scraped load): what restoring the node writes back."""
    fields = {
        "id": node.id,
        "url": node.url,
        "models": encode_models(node.models),
        "role": str(int(node.role)),
        "weight": repr(node.weight),
        "state": node.state.value,
        "state_reason": node.state_reason,
        "state_since_ms": str(node.state_since_ms),
        "added_ms": str(node.added_ms),
    }
    if node.speed is not None:
        fields["speed"] = repr(node.speed)
    if node.api_key:
        fields["api_key"] = node.api_key
    if node.insecure:
        fields["insecure"] = "1"
    if node.cache_blocks:
        fields["cache_blocks"] = str(node.cache_blocks)
    if node.max_inflight:
        fields["max_inflight"] = str(node.max_inflight)
    return fields


class RegistryView:
    """A replica's cached copy of the registry, indexed by model; replaced when the epoch moves."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.by_id = {n.id: n for n in registry.nodes}
        index: dict[str, list[str]] = {}
        for node in sorted(registry.nodes, key=lambda n: n.id):
            for model in node.models:
                index.setdefault(model, []).append(node.id)
        self._by_model = {m: tuple(ids) for m, ids in index.items()}
        # Computed on first use per (model, role): the view is immutable for its epoch.
        self._candidates: dict[tuple[str, int], tuple[str, ...]] = {}

    @property
    def epoch(self) -> int:
        return self.registry.epoch

    @property
    def generation(self) -> str:
        return self.registry.generation

    @property
    def key_digests(self) -> frozenset[str]:
        return self.registry.key_digests

    def serves(self, model: str) -> bool:
        return model in self._by_model

    def models(self, *, active_only: bool = True) -> list[str]:
        """The de-duplicated models of the registry, in first-registered order of their nodes."""
        seen: dict[str, None] = {}
        for node in sorted(self.registry.nodes, key=lambda n: (n.added_ms, n.id)):
            if active_only and node.state is not NodeState.ACTIVE:
                continue
            for m in node.models:
                seen.setdefault(m, None)
        return list(seen)

    def candidates(self, model: str, role: int = 0, exclude: Iterable[str] = ()) -> list[str]:
        """Active nodes serving ``model`` in ``role`` (0: any), ordered by id."""
        key = (model, role)
        found = self._candidates.get(key)
        if found is None:
            found = tuple(
                node_id
                for node_id in self._by_model.get(model, ())
                if self.by_id[node_id].state is NodeState.ACTIVE
                and (not role or self.by_id[node_id].role == role)
            )
            self._candidates[key] = found
        if exclude:
            skip = set(exclude)
            return [n for n in found if n not in skip]
        return list(found)

    def pool(self, node_id: str) -> list[str]:
        """Active nodes sharing a model with ``node_id``, itself included."""
        node = self.by_id.get(node_id)
        if node is None:
            return [node_id]
        ids = {node_id}
        for model in node.models:
            for other in self._by_model.get(model, ()):
                if self.by_id[other].state is NodeState.ACTIVE:
                    ids.add(other)
        return sorted(ids)
