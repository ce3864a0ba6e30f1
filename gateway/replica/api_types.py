"""The shapes of the answers and admin bodies fleetgate writes itself (the node API, health,
readiness, models, DistServe, errors), as msgspec Structs: /openapi.json is made of their JSON
schemas (:mod:`.openapi`).

The handlers build their answers as dicts; the tests decode real answers with these types,
whose answers forbid unknown fields, so a field added to an answer and not here fails a test.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from shared_state import NodeState, Role
from shared_state.model import RestoreRecord

Url = Annotated[str, msgspec.Meta(description="a node's base URL, e.g. http://10.0.0.5:23333")]


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An answer: an unknown field is an error when decoded (the tests decode answers)."""


class Body(msgspec.Struct, kw_only=True):
    """An admin body: fields fleetgate does not know are ignored."""


# -- the OpenAI-shaped error every fleetgate-written error has --------------------------------


class ErrorDetail(Strict):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class Error(Strict):
    """OpenAI's error object, on every endpoint but Anthropic's."""

    error: ErrorDetail


class AnthropicErrorDetail(Strict):
    type: str
    message: str


class AnthropicError(Strict):
    """Anthropic's error object, on /v1/messages and /v1/messages/count_tokens."""

    type: Literal["error"]
    error: AnthropicErrorDetail


# -- health, readiness, models ----------------------------------------------------------------


class Health(Strict):
    status: Literal["ok"]
    replica: str


class LastLoss(Strict):
    """A registry the store lost, as this replica saw it."""

    cached_epoch: int
    found_epoch: int
    detected_ms: int
    nodes: int
    keys: int
    restored: bool
    by_this_replica: bool
    error: str
    summary: str


class RegistryState(Strict):
    epoch: int | None
    lost: bool
    restores_by_this_replica: int
    last_loss: LastLoss | None
    last_restore: RestoreRecord | None


class Ready(Strict):
    """200 when ready, 503 with its reasons when not."""

    ready: bool
    store: Literal["ok", "unreachable", "refusing writes", "failing"]
    degraded: bool
    active_nodes: int
    replica: str
    reasons: list[str]
    registry: RegistryState


class Model(Strict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str


class ModelList(Strict):
    object: Literal["list"]
    data: list[Model]


# -- the node API ----------------------------------------------------------------------------


class Registration(Body):
    """LMDeploy's self-registration ``status`` object."""

    models: list[str] | None = None
    role: int | str | None = None  # 1 Hybrid, 2 Prefill, 3 Decode, or the name
    speed: float | None = None
    cache_blocks: int | None = None
    max_inflight: int | None = None


class NodeAdd(Body):
    """``POST /nodes/add``: LMDeploy's ``{"url", "status": {...}}``, or ``{"url"}`` alone (the
    models asked from the node's /v1/models); the other fields only an admin may set."""

    url: Url
    status: Registration | None = None
    models: list[str] | None = None
    role: int | str | None = None
    speed: float | None = None
    weight: float | None = None
    api_key: str | None = None
    insecure: bool | None = None
    cache_blocks: int | None = None
    max_inflight: int | None = None


class NodeTarget(Body):
    """The node an admin call is about (also accepted as the ``node_url`` query parameter)."""

    url: Url


class NodeJson(Strict):
    url: Url
    models: list[str]
    role: Role
    speed: float | None
    weight: float
    cache_blocks: int | None
    max_inflight: int | None
    state: NodeState


class NodeAdded(Strict):
    message: str
    created: bool
    node: NodeJson


class Probe(Strict):
    failures: int
    successes: int
    last_ms: int
    detail: str


class QueueDepth(Strict):
    """Requests waiting in the fleet's queue of one model, by priority."""

    high: int
    normal: int
    low: int


class NodeStatusEntry(Strict):
    """One node in ``GET /nodes/status`` (keyed by its URL): LMDeploy's fields first."""

    models: list[str]
    unfinished: int
    latency: list[float]
    speed: float | None
    role: Role
    state: NodeState
    state_reason: str
    weight: float
    has_api_key: bool
    insecure: bool
    ejected_until_ms: int
    consecutive_failures: int
    ok_total: int
    fail_total: int
    cache_blocks: int | None
    prefix_blocks: int
    max_inflight: int | None
    kv_cache_usage: float | None
    requests_running: int | None
    requests_waiting: int | None
    probe: Probe
    queue: dict[str, QueueDepth]
    state_since_ms: int | None = None  # when it entered its state (server ms)


class Replicas(Strict):
    replicas: dict[str, int]  # replica id -> its last lease renewal (server ms)
    count: int


class DistServeDropped(Strict):
    pairs_dropped: int
    sessions: int
    freed: int


class NodeRemoved(Strict):
    message: str
    url: Url
    distserve: DistServeDropped


class NodeDraining(Strict):
    message: str
    node: NodeJson
    unfinished: int


class Terminated(Strict):
    """A node removed and asked to stop through its /terminate."""

    url: Url
    removed: bool
    terminated: bool
    detail: str | None = None


class NodeTerminated(Terminated):
    """200 when the node stopped; 502 (with ``error``) when removed but not stopped."""

    message: str | None = None
    error: ErrorDetail | None = None


class AllTerminated(Strict):
    message: str
    nodes: dict[str, Terminated]


# -- DistServe -------------------------------------------------------------------------------


class PairOutcome(Strict):
    prefill: Url
    decode: Url
    status: Literal["connected", "already_connected", "failed"]
    detail: str


class Warmup(Strict):
    success: bool
    pairs: list[PairOutcome]
    connected: int
    already_connected: int
    failed: int
    error: ErrorDetail | None = None


class Collected(Strict):
    success: bool
    expired: int
    orphaned: int
    freed: int
    failed: int
    in_migration: int
