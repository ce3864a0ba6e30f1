"""The gateway's settings: one frozen object built once from flags, environment and file."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.common.config import (
    ConfigError,
    Option,
    boolean,
    int_range,
    non_empty,
    port,
    positive_float,
    process_id,
    resolve,
)
from shared_state import Strategy, normalize_url
from shared_state.connection import is_embedded
from shared_state.errors import InvalidInput
from shared_state.prefix import CACHE_UNITS, MAX_CAPACITY

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _strategy(text: str) -> Strategy:
    try:
        return Strategy(text)
    except ValueError:
        raise ValueError(
            f"unknown strategy {text!r}; expected one of: {', '.join(s.value for s in Strategy)}"
        ) from None


def _serving(text: str) -> str:
    if text.strip().lower() == "hybrid":
        return "Hybrid"
    if text.strip().lower() == "distserve":
        return "DistServe"
    raise ValueError(f"serving strategy must be Hybrid or DistServe, not {text!r}")


def _migration_protocol(text: str) -> str:
    value = text.strip().upper()
    if value not in ("RDMA", "NVLINK"):  # LMDeploy has no TCP migration yet
        raise ValueError(f"migration protocol must be RDMA or NVLINK, not {text!r}")
    return value


def _link_type(text: str) -> str:
    for name in LINK_TYPES:
        if text.strip().lower() == name.lower():
            return name
    raise ValueError(f"link type must be RoCE or IB, not {text!r}")


def _readable(text: str) -> str:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file: {text}")
    return str(path)


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not a network in CIDR form: {text!r}") from None


def _balance(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(f"expected a number >= 0, got {text!r}")
    return value


def _cache_unit(text: str) -> str:
    value = text.strip().lower()
    if value not in CACHE_UNITS:
        raise ValueError(f"expected {' or '.join(CACHE_UNITS)}, got {text!r}")
    return value


def _reserve(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 0.9:
        raise ValueError(f"expected a number from 0 to 0.9, got {text!r}")
    return value


def _node_url(text: str) -> str:
    try:
        return normalize_url(text)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None


# LMDeploy's enum values, which its api_server expects in DistServe requests.
MIGRATION_PROTOCOLS = {"TCP": 1, "RDMA": 2, "NVLINK": 3}
LINK_TYPES = {"IB": 1, "RoCE": 2}

OPTIONS: tuple[Option, ...] = (
    Option("host", non_empty, "127.0.0.1", "address to listen on", aliases=("server-name",)),
    Option("port", port, 8000, "port to listen on", aliases=("server-port",)),
    Option("workers", int_range(1, 64), 1, "worker processes (needs --redis-url when > 1)"),
    Option(
        "redis-url",
        str,
        None,
        "Redis URL (redis://, rediss://, unix://, "
        "redis+sentinel://); absent: the embedded single-replica store",
    ),
    Option("prefix", non_empty, "fleetgate", "key prefix (hash tag) in Redis"),
    Option(
        "strategy",
        _strategy,
        Strategy.MIN_EXPECTED_LATENCY,
        "routing strategy",
        aliases=("routing-strategy",),
    ),
    Option(
        "serving-strategy",
        _serving,
        "Hybrid",
        "Hybrid (a node serves whole requests) or DistServe (prefill on a Prefill node, "
        "decode on a Decode node after the KV cache migrates)",
    ),
    Option(
        "migration-protocol",
        _migration_protocol,
        "RDMA",
        "DistServe: how the KV cache migrates, RDMA or NVLINK",
    ),
    Option("link-type", _link_type, "RoCE", "DistServe with RDMA: RoCE or IB"),
    Option(
        "dummy-prefill",
        boolean,
        False,
        "DistServe: skip the Prefill nodes (the Decode node prefills itself); for testing",
        switch=True,
    ),
    Option(
        "prefix-block-bytes",
        int_range(16, 1 << 16),
        256,
        "cache_aware: bytes of the canonical prompt per block (about 4 per token; every "
        "replica must use the same)",
    ),
    Option(
        "prefix-cache-blocks",
        int_range(1, MAX_CAPACITY),
        4096,
        "cache_aware: a node's prefix-cache capacity in blocks when its record sets none",
    ),
    Option(
        "prefix-cache-unit",
        _cache_unit,
        "blocks",
        "cache_aware: what the nodes' prefix caches keep, blocks (vLLM, SGLang) or whole "
        "prompts (llama.cpp's llama-server); every replica must use the same",
    ),
    Option(
        "prefix-balance",
        _balance,
        0.5,
        "cache_aware: a node takes a request only while its requests in flight stay within "
        "(1 + this) x the mean of the candidates, so a hot prefix spreads",
    ),
    Option(
        "prefix-balance-slack",
        _balance,
        2.0,
        "cache_aware: or within the mean + this many requests, whichever is more, so a chat's "
        "turn waits for its busy node at a low load rather than prefill its prompt elsewhere",
    ),
    Option(
        "prefix-request-blocks",
        positive_float,
        4.0,
        "cache_aware: what one request in flight on a node costs a new one, in blocks of prefill",
    ),
    Option("node", _node_url, (), "register this node at start (repeatable)", repeatable=True),
    Option(
        "api-key",
        non_empty,
        (),
        "client API key (repeatable); none: open",
        repeatable=True,
        list_alias="api-keys",
    ),
    Option("admin-key", non_empty, None, "key for /nodes/*; absent: admin from loopback only"),
    Option(
        "register-allow",
        _network,
        (),
        "network allowed to /nodes/add without a key (repeatable)",
        repeatable=True,
    ),
    Option("lease-seconds", positive_float, 30.0, "lease time of a request on a node, s"),
    Option("connect-timeout", positive_float, 2.0, "upstream connect timeout, s"),
    Option("first-byte-timeout", positive_float, 300.0, "upstream time to response headers, s"),
    Option("request-timeout", positive_float, 900.0, "upstream whole-request timeout, s"),
    Option("max-body-bytes", int_range(1, 1 << 31), 16 << 20, "largest request body, bytes"),
    Option(
        "body-timeout",
        positive_float,
        30.0,
        "time a client has to send its whole request body, s (then 408)",
    ),
    Option("max-attempts", int_range(1, 10), 3, "nodes tried per request (first byte not sent)"),
    Option(
        "max-queue",
        int_range(0, 1_000_000),
        1000,
        "requests that may wait per model while its nodes are at their max_inflight (0: no "
        "bound); over it, 429 queue_full at once",
    ),
    Option(
        "priority-reserve",
        _reserve,
        0.1,
        "the share of a node's max_inflight kept for high-priority requests (its floor in "
        "slots: 0.1 keeps 1 of 10-19); normal and low ones queue while only those are free",
    ),
    Option(
        "queue-timeout",
        positive_float,
        30.0,
        "longest wait for a node with room, s; then 503 queue_timeout with Retry-After",
    ),
    Option("store-timeout", positive_float, 0.25, "Redis socket timeout, s"),
    Option(
        "shutdown-timeout",
        positive_float,
        10.0,
        "on SIGTERM (or SIGINT, or the master of --workers gone) the grace period, s: new "
        "connections are refused at once, requests in flight may finish within it; then "
        "each is cut (a stream ends with an OpenAI-shaped SSE error event, an answer not "
        "begun is a 503) and its lease released",
        aliases=("shutdown-grace",),
    ),
    Option("replica-id", non_empty, None, "this replica's id in leases (default: host-pid-random)"),
    Option("log-level", non_empty, "info", "log level"),
    Option("access-log", boolean, True, "one JSON line per request with its route receipt"),
    Option("ssl", boolean, False, "serve HTTPS with --certfile and --keyfile", switch=True),
    Option("certfile", _readable, None, "TLS certificate (PEM)", extra_env=("SSL_CERTFILE",)),
    Option("keyfile", _readable, None, "TLS private key (PEM)", extra_env=("SSL_KEYFILE",)),
    Option(
        "upstream-ca-bundle",
        _readable,
        None,
        "CA bundle that verifies https:// nodes (default: the system's)",
    ),
    Option(
        "disable-cache-status",
        boolean,
        False,
        "LMDeploy's flag, accepted with no effect: the state lives in the store",
        switch=True,
    ),
)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    redis_url: str | None = None
    prefix: str = "fleetgate"
    strategy: Strategy = Strategy.MIN_EXPECTED_LATENCY
    prefix_block_bytes: int = 256
    prefix_cache_blocks: int = 4096
    prefix_cache_unit: str = "blocks"
    prefix_balance: float = 0.5
    prefix_balance_slack: float = 2.0
    prefix_request_blocks: float = 4.0
    node: tuple[str, ...] = ()
    api_key: tuple[str, ...] = ()
    admin_key: str | None = None
    register_allow: tuple[IPNetwork, ...] = ()
    lease_seconds: float = 30.0
    connect_timeout: float = 2.0
    first_byte_timeout: float = 300.0
    request_timeout: float = 900.0
    max_body_bytes: int = 16 << 20
    body_timeout: float = 30.0
    max_attempts: int = 3
    max_queue: int = 1000
    priority_reserve: float = 0.1
    queue_timeout: float = 30.0
    store_timeout: float = 0.25
    shutdown_timeout: float = 10.0
    replica_id: str | None = None
    log_level: str = "info"
    access_log: bool = True
    serving_strategy: str = "Hybrid"
    migration_protocol: str = "RDMA"
    link_type: str = "RoCE"
    dummy_prefill: bool = False
    ssl: bool = False
    certfile: str | None = None
    keyfile: str | None = None
    upstream_ca_bundle: str | None = None
    disable_cache_status: bool = False

    @property
    def embedded(self) -> bool:
        return is_embedded(self.redis_url)

    def replica(self) -> str:
        """This process's replica id: configured, or unique per process."""
        if self.replica_id:
            return self.replica_id.replace(":", "-")
        return process_id().replace(":", "-")


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> GatewaySettings:
    """Build the settings; :class:`ConfigError` carries the one-line reason to stop."""
    values = resolve("fleetgate serve", "Run one gateway replica.", OPTIONS, argv, environ)
    settings = GatewaySettings(**values)
    if settings.workers > 1 and settings.embedded:
        raise ConfigError(
            "--workers > 1 needs --redis-url: each worker would keep its own embedded state"
        )
    if settings.redis_url is not None and not settings.embedded:
        scheme = settings.redis_url.split("://", 1)[0]
        if scheme not in {"redis", "rediss", "unix", "redis+sentinel", "sentinel"}:
            raise ConfigError(f"--redis-url: unsupported scheme {scheme!r}")
    if settings.ssl and not (settings.certfile and settings.keyfile):
        raise ConfigError("--ssl needs --certfile and --keyfile (or SSL_CERTFILE and SSL_KEYFILE)")
    if settings.first_byte_timeout > settings.request_timeout:
        raise ConfigError("--first-byte-timeout must not exceed --request-timeout")
    return settings
