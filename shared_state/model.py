"""Typed values that leave the shared state: nodes, picks, releases, strategies."""

from __future__ import annotations

import enum

import msgspec


class Role(enum.IntEnum):
    """A node's serving role, numbered as LMDeploy numbers them."""

    HYBRID = 1
    PREFILL = 2
    DECODE = 3


class NodeState(enum.StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"


class Strategy(enum.StrEnum):
    RANDOM = "random"
    ROUND_ROBIN = "round_robin"
    LEAST_CONNECTIONS = "least_connections"
    MIN_EXPECTED_LATENCY = "min_expected_latency"
    MIN_OBSERVED_LATENCY = "min_observed_latency"
    MIN_CACHE_USAGE = "min_cache_usage"
    WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
    WEIGHTED_LEAST_CONNECTIONS = "weighted_least_connections"
    SESSION_AFFINITY = "session_affinity"
    CACHE_AWARE = "cache_aware"


class Outcome(enum.StrEnum):
    """How a request ended, as the latency history and passive ejection see it."""

    OK = "ok"
    FAIL = "fail"  # connect error, reset, 502/503/504, timeout: counts as a slow sample
    NEUTRAL = "neutral"  # client error or cancellation: no sample, no failure


class Node(msgspec.Struct, frozen=True, kw_only=True):
    """One registered node as stored in its hash."""

    id: str
    url: str
    models: tuple[str, ...]
    role: Role = Role.HYBRID
    speed: float | None = None
    weight: float = 1.0
    api_key: str | None = None
    insecure: bool = False  # https without certificate checks
    cache_blocks: int | None = None  # prefix-cache capacity in blocks; None: the default
    max_inflight: int | None = None  # requests it runs at once at most; None: unlimited
    state: NodeState = NodeState.ACTIVE
    state_reason: str = ""
    state_since_ms: int = 0
    added_ms: int = 0
    ejected_until_ms: int = 0
    eject_count: int = 0
    consecutive_failures: int = 0
    ok_total: int = 0
    fail_total: int = 0
    kv_usage: float | None = None
    kv_running: int | None = None
    kv_waiting: int | None = None
    kv_ts_ms: int | None = None
    probe_failures: int = 0
    probe_successes: int = 0
    last_probe_ms: int = 0
    probe_detail: str = ""


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A node with its live load: leases in force and recent latencies (seconds)."""

    node: Node
    in_flight: int
    latencies_s: tuple[float, ...]
    prefix_blocks: int = 0  # prompt blocks the prefix index says it holds (cache_aware)


class Priority(enum.IntEnum):
    """A request's place in the fleet's queue: every waiting ``HIGH`` request is admitted
    before any ``NORMAL`` one, every ``NORMAL`` before any ``LOW``."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


class KeyAdmission(msgspec.Struct, frozen=True):
    """A client key's admission settings: the priority of its requests that name none, the
    highest priority they may ask for (``None``: any), and its weight in the fair share."""

    priority: Priority = Priority.NORMAL
    max_priority: Priority | None = None
    share: int = 1


class Registry(msgspec.Struct, frozen=True):
    """A consistent-enough snapshot of the registry, tagged with the epoch it was read at,
    with the digests of the client API keys kept in the store."""

    epoch: int
    nodes: tuple[Node, ...]
    key_digests: frozenset[str] = frozenset()
    # Only the keys that carry limits: hex digest -> (requests per minute, concurrent
    # requests), 0 meaning unlimited. A key absent here costs no limit check.
    key_limits: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)
    # Only the keys that carry admission settings (a priority, a cap, a share other than 1):
    # hex digest -> its settings. A key absent here is normal priority, uncapped, share 1.
    key_admission: dict[str, KeyAdmission] = msgspec.field(default_factory=dict)
    # Keys were stored once (the keys-required marker): the OpenAI API needs a key even when
    # none is left, until an operator opens it on purpose.
    keys_required: bool = False
    # What a restore needs besides: every key's stored JSON entry (hex digest -> entry), and
    # the registry's generation ("" when the store has none: see registry_restore.lua).
    key_entries: dict[str, str] = msgspec.field(default_factory=dict)
    generation: str = ""


class RestoreRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The store's restore record: the registry's generation and, once a replica restored the
    registry, who did, when (server ms), the epoch found and the one written, and what."""

    generation: str
    by: str = ""
    at_ms: int = 0
    found_epoch: int | None = None
    epoch: int | None = None
    nodes: int = 0
    keys: int = 0

    @property
    def restored(self) -> bool:
        return self.epoch is not None


class Restore(msgspec.Struct, frozen=True):
    """What registry_restore.lua did: ``status`` is restored, stamped or current."""

    status: str
    epoch: int
    nodes: int
    keys: int


class ApiKey(msgspec.Struct, frozen=True):
    """A client API key as the store knows it: never the key itself."""

    name: str
    fingerprint: str  # the first 12 hex digits of the key's SHA-256
    created_ms: int
    rpm: int = 0  # requests per minute, across all replicas; 0: unlimited
    concurrency: int = 0  # requests in flight at once, across all replicas; 0: unlimited
    priority: Priority = Priority.NORMAL  # of its requests that ask for none
    max_priority: Priority | None = None  # the highest its requests may ask for; None: any
    share: int = 1  # its weight in the fair share of a queue


class Lease(msgspec.Struct, frozen=True):
    """A reservation of one request on one node; ``member`` is ``<replica>:<request-id>``.

    ``load`` is the node's requests in flight when it was taken, this one included: a latency
    sample is recorded divided by it (and by the answer's output tokens), so the window learns
    the node's speed while the load of the moment comes from the live lease counts."""

    node_id: str
    member: str
    load: int = 1


class Pick(msgspec.Struct, frozen=True, kw_only=True):
    """The winner of pick-and-reserve and why it won."""

    lease: Lease
    node: Node
    in_flight: int
    score: float
    epoch: int
    eligible: int
    reused: bool
    strategy: Strategy = Strategy.MIN_EXPECTED_LATENCY
    # cache_aware: blocks of the prompt's chain the winner held before, and in the chain.
    prefix_matched: int = 0
    prefix_total: int = 0


class Release(msgspec.Struct, frozen=True, kw_only=True):
    released: bool
    consecutive_failures: int
    ejected_until_ms: int  # the node's ejection in force, 0 when none
    ejected_now: bool = False  # this release's failure made that ejection


class ProbeResult(enum.StrEnum):
    OK = "ok"
    FAIL = "fail"
    NONE = "none"  # no liveness probe this time; other findings are still recorded


class HealthReport(msgspec.Struct, frozen=True):
    """What a health report did: ``status`` is ok, gone or removed."""

    status: str
    state: str
    changed: bool


class Event(msgspec.Struct, frozen=True):
    """One recorded state transition of a node."""

    t_ms: int
    node: str
    reason: str
    by: str
    from_state: str = msgspec.field(name="from")
    to_state: str = msgspec.field(name="to")


class Sweep(msgspec.Struct, frozen=True):
    pruned_leases: int
    live_replicas: dict[str, int]
