"""What the routing benchmark offers the gateways: simulated nodes of unequal capacity, output
lengths, the strategy and replica set-ups compared, and the seeded arrival schedule."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

STRATEGIES = (
    "random",
    "round_robin",
    "least_connections",
    "min_cache_usage",
    "weighted_round_robin",
    "weighted_least_connections",
    "session_affinity",
    "min_expected_latency",
    "min_observed_latency",
)
LATENCY_STRATEGIES = ("min_expected_latency", "min_observed_latency")
OTHER_STRATEGIES = tuple(s for s in STRATEGIES if s not in LATENCY_STRATEGIES)
CHATS = 64  # distinct X-Session-ID values over the requests (session_affinity's keys)


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One simulated node: batch slots, decode rate per sequence, prefill time."""

    name: str
    slots: int
    tokens_per_s: float
    prefill_ms: float

    @property
    def speed(self) -> float:
        """What the node is registered with: its decode capacity in tokens/s."""
        return self.slots * self.tokens_per_s

    def service_s(self, mean_tokens: float) -> float:
        """Seconds one request of ``mean_tokens`` output tokens holds a slot."""
        return self.prefill_ms / 1000 + mean_tokens / self.tokens_per_s

    def capacity_rps(self, mean_tokens: float) -> float:
        """Requests/s the node can answer when every slot is busy."""
        return self.slots / self.service_s(mean_tokens)


# One sequence at a time on every node: a request sent to a busy node waits for a whole
# answer, the case where a router's view of the load matters most. With batches (2 slots on
# the fast nodes, or on all four), the waits are shorter, and so is the price of a partial
# view: private replicas then cost min_expected_latency 12-25% in mean latency, and
# min_observed_latency, whose latency samples still carry the load the other replicas put on
# a node, 1-17%, close to the runs' spread; with one slot they cost 22-31% and 17-23%.
DEFAULT_NODES = (
    NodeSpec("fast-1", 1, 320.0, 10.0),
    NodeSpec("fast-2", 1, 320.0, 10.0),
    NodeSpec("slow-1", 1, 160.0, 20.0),
    NodeSpec("slow-2", 1, 160.0, 20.0),
)


def parse_nodes(text: str) -> tuple[NodeSpec, ...]:
    """``name:slots:tokens_per_s:prefill_ms`` items, comma-separated."""
    nodes = []
    for item in text.split(","):
        name, slots, tps, prefill = item.strip().split(":")
        nodes.append(NodeSpec(name, int(slots), float(tps), float(prefill)))
    if len({n.name for n in nodes}) != len(nodes) or not nodes:
        raise ValueError("node names must be distinct")
    return tuple(nodes)


@dataclass(frozen=True, slots=True)
class Lengths:
    """Output lengths: a lognormal with this median and sigma, rounded, in [1, cap]."""

    median: float = 32.0
    sigma: float = 0.5
    cap: int = 128

    def draw(self, rng: random.Random) -> int:
        """One length from ``rng``."""
        return max(1, min(self.cap, round(rng.lognormvariate(math.log(self.median), self.sigma))))

    def mean(self) -> float:
        """E[min(X, cap)] of the lognormal, in closed form."""
        mu, s, c = math.log(self.median), self.sigma, float(self.cap)

        def phi(x: float) -> float:
            return 0.5 * (1 + math.erf(x / math.sqrt(2)))

        below = math.exp(mu + s * s / 2) * phi((math.log(c) - mu - s * s) / s)
        return below + c * (1 - phi((math.log(c) - mu) / s))


@dataclass(frozen=True, slots=True)
class Setup:
    """A strategy and a replica set-up: 1 replica on Redis, N sharing Redis, or N private."""

    strategy: str
    replicas: int
    shared: bool

    @property
    def mode(self) -> str:
        if self.replicas == 1:
            return "1 replica"
        return f"{self.replicas} {'shared' if self.shared else 'private'}"

    @property
    def key(self) -> str:
        return f"{self.strategy}/{self.mode.replace(' ', '-')}"

    def registrars(self, gateways: Sequence[T]) -> Sequence[T]:
        """The gateways nodes are registered with: the first when they share Redis (every
        replica reads the one registry), each one on private stores."""
        return gateways[:1] if self.shared else gateways


def comparison_setups(quick: bool) -> list[Setup]:
    """The set-ups the comparison runs: every strategy on 4 shared replicas, and the latency
    strategies also on 1 replica and on 4 private ones (fewer of both when ``quick``)."""
    setups: list[Setup] = []
    others = ("random", "round_robin") if quick else OTHER_STRATEGIES
    setups += [Setup(s, 4, True) for s in others]
    for strategy in LATENCY_STRATEGIES[:1] if quick else LATENCY_STRATEGIES:
        setups += [Setup(strategy, 1, True), Setup(strategy, 4, True), Setup(strategy, 4, False)]
    return setups


@dataclass
class Scenario:
    """The nodes, output lengths, offered load (a fraction of capacity) and streamed share."""

    nodes: tuple[NodeSpec, ...]
    lengths: Lengths
    load: float
    stream_fraction: float

    @property
    def mean_tokens(self) -> float:
        return self.lengths.mean()

    @property
    def capacity_rps(self) -> float:
        return sum(n.capacity_rps(self.mean_tokens) for n in self.nodes)

    def rate(self, load: float | None = None) -> float:
        """Requests/s at ``load`` (default: the scenario's) of the fleet's capacity."""
        return (self.load if load is None else load) * self.capacity_rps

    def describe(self) -> dict[str, Any]:
        """The scenario as the results record it."""
        m = self.mean_tokens
        return {
            "nodes": [
                {
                    "name": n.name,
                    "slots": n.slots,
                    "tokens_per_s": n.tokens_per_s,
                    "prefill_ms": n.prefill_ms,
                    "speed": n.speed,
                    "capacity_rps": round(n.capacity_rps(m), 3),
                    "capacity_share": round(n.capacity_rps(m) / self.capacity_rps, 4),
                }
                for n in self.nodes
            ],
            "lengths": {
                "median": self.lengths.median,
                "sigma": self.lengths.sigma,
                "cap": self.lengths.cap,
                "mean": round(m, 2),
            },
            "stream_fraction": self.stream_fraction,
            "capacity_rps": round(self.capacity_rps, 3),
            "load": self.load,
            "rate_rps": round(self.rate(), 3),
        }


@dataclass(frozen=True, slots=True)
class Arrival:
    """One scheduled request."""

    at: float  # s after the start of the run
    tokens: int
    stream: bool
    u: float  # uniform in [0, 1): picks the replica, as an L4 balancer would
    chat: int  # which conversation it belongs to: its X-Session-ID


def make_schedule(
    seed: int, rate: float, span_s: float, lengths: Lengths, stream_fraction: float
) -> list[Arrival]:
    """Poisson arrivals at ``rate``/s over ``span_s``; the same seed gives the same list.

    The process is conditioned on its expected count: exactly ``round(rate * span_s)``
    arrivals, at independent uniform times (which, given the count, is what a Poisson process
    is). Every run then offers exactly the set load, with the same burstiness; unconditioned,
    one run in ten would carry 10% more or less work than asked, and differences between
    set-ups shrink or grow with it.
    """
    rng = random.Random(seed)
    chats = random.Random(f"chats-{seed}")  # its own stream: the rest is as without chats
    times = sorted(rng.uniform(0.0, span_s) for _ in range(round(rate * span_s)))
    return [
        Arrival(
            t,
            lengths.draw(rng),
            rng.random() < stream_fraction,
            rng.random(),
            chats.randrange(CHATS),
        )
        for t in times
    ]
