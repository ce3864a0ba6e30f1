"""Routing state shared by all gateway replicas, kept in Redis and changed by Lua scripts."""

from .errors import (
    Fenced,
    InvalidInput,
    NodesFull,
    StateError,
    StoreRefusingWrites,
    StoreUnavailable,
    UnknownKey,
    UnknownNode,
    UnknownStrategy,
)
from .health import HealthLedger
from .key_records import key_digest
from .model import (
    ApiKey,
    KeyAdmission,
    Lease,
    Node,
    NodeState,
    NodeStatus,
    Outcome,
    Pick,
    Priority,
    ProbeResult,
    Registry,
    Release,
    Role,
    Strategy,
)
from .pd import PDSession, PDState
from .prefix import MAX_CHAIN_BLOCKS, PrefixSettings
from .prefix_index import PrefixIndex
from .registry import RegistryView, normalize_url
from .schema import KeySchema
from .store import Store, StoreSettings

__all__ = [
    "MAX_CHAIN_BLOCKS",
    "ApiKey",
    "Fenced",
    "HealthLedger",
    "InvalidInput",
    "KeyAdmission",
    "KeySchema",
    "Lease",
    "Node",
    "NodeState",
    "NodeStatus",
    "NodesFull",
    "Outcome",
    "PDSession",
    "PDState",
    "Pick",
    "PrefixIndex",
    "PrefixSettings",
    "Priority",
    "ProbeResult",
    "Registry",
    "RegistryView",
    "Release",
    "Role",
    "StateError",
    "Store",
    "StoreRefusingWrites",
    "StoreSettings",
    "StoreUnavailable",
    "Strategy",
    "UnknownKey",
    "UnknownNode",
    "UnknownStrategy",
    "key_digest",
    "normalize_url",
]
