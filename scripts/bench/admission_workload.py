"""The admission benchmark's scenario (scripts/bench_admission.py): nodes of a known capacity,
the set-ups compared, the clients that overload them and the stream of high-priority requests.

Invariants:

- The fleet's slots are its nodes' ``max_inflight`` (each simulated node runs exactly as many
  requests at once as its ``--slots``); its capacity in requests/s is those slots over the
  mean answer's decode time.
- Normal-priority requests may fill ``max_inflight - floor(max_inflight x reserve)`` slots of a
  node (at least one), high-priority ones all of them, as the gateway's ``slots_for`` counts.
- The same seed gives the same high-priority arrivals and the same answer lengths on every
  machine and in every set-up of a run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

KEYS = ("a", "b")  # the two client keys of equal share; "a" runs ``heavy`` times the loops
HIGH = "high"  # the third key, which sends the high-priority stream


@dataclass(frozen=True, slots=True)
class AdmissionSetup:
    """One way of running the fleet: nodes registered with a capacity (``capped``) or not, the
    gateways' ``--priority-reserve`` (None: the gateway's default), and whether the client
    loops run (False: the high-priority stream alone, on an idle fleet)."""

    key: str
    label: str
    capped: bool
    reserve: float | None = None
    loops: bool = True


def idle_setup(judged: AdmissionSetup) -> AdmissionSetup:
    """The idle fleet: registered and run as ``judged``, without the client loops."""
    label = "idle fleet, high priority alone"
    return AdmissionSetup("idle", label, judged.capped, judged.reserve, loops=False)


def setups(reserve: float) -> dict[str, AdmissionSetup]:
    """The set-ups by key: fleet-wide admission with ``reserve``, the same with the gateway's
    default reserve, and today's behaviour without admission."""
    return {
        "admission": AdmissionSetup("admission", f"admission (reserve {reserve:g})", True, reserve),
        "default-reserve": AdmissionSetup(
            "default-reserve", "admission (default reserve 0.1)", True, None
        ),
        "none": AdmissionSetup("none", "no admission", False),
    }


@dataclass(frozen=True, slots=True)
class AdmissionScenario:
    """``nodes`` simulated nodes of ``max_inflight`` slots decoding ``tokens_per_s`` per
    sequence; answers of ``min_tokens`` to ``max_tokens`` tokens (uniform); key "b" runs
    ``clients`` closed loops and key "a" ``heavy`` times as many; high-priority requests
    arrive open loop (Poisson) at ``high_fraction`` of the fleet's capacity, streamed. A run
    lasts ``duration_s``; figures of the backlogged state count from ``warmup_s`` on."""

    nodes: int = 4
    max_inflight: int = 4
    tokens_per_s: float = 50.0
    min_tokens: int = 16
    max_tokens: int = 32
    clients: int = 8
    heavy: int = 4
    high_fraction: float = 0.05
    duration_s: float = 60.0
    warmup_s: float = 5.0
    reserve: float = 0.25
    replicas: int = 2
    client_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.max_inflight < 1 or self.clients < 1 or self.heavy < 1:
            raise ValueError("nodes, max_inflight, clients and heavy must be >= 1")
        if not 1 <= self.min_tokens <= self.max_tokens or not self.tokens_per_s > 0:
            raise ValueError("1 <= min_tokens <= max_tokens; tokens_per_s > 0")
        if not 0 < self.high_fraction < 1 or not 0 <= self.reserve < 1:
            raise ValueError("0 < high_fraction < 1; 0 <= reserve < 1")
        if not 0 <= self.warmup_s < self.duration_s or self.replicas < 1:
            raise ValueError("0 <= warmup_s < duration_s; replicas >= 1")
        if not self.client_timeout_s > 0:
            raise ValueError("client_timeout_s > 0")

    @property
    def slots(self) -> int:
        """Requests the whole fleet runs at once."""
        return self.nodes * self.max_inflight

    @property
    def service_s(self) -> float:
        """The mean answer's decode time on an idle node."""
        return (self.min_tokens + self.max_tokens) / 2 / self.tokens_per_s

    @property
    def capacity_rps(self) -> float:
        """Answers per second the fleet gives with every slot busy."""
        return self.slots / self.service_s

    @property
    def high_rate_rps(self) -> float:
        return self.high_fraction * self.capacity_rps

    @property
    def loops(self) -> dict[str, int]:
        """Closed client loops by key."""
        return {"a": self.heavy * self.clients, "b": self.clients}

    @property
    def offered(self) -> float:
        """Requests outstanding at once (the loops) over the fleet's slots."""
        return sum(self.loops.values()) / self.slots

    def normal_slots(self, reserve: float | None) -> int:
        """The slots of a node normal-priority requests may fill (``slots_for``); None: the
        gateway's default reserve, 0.1."""
        kept = math.floor(self.max_inflight * (0.1 if reserve is None else reserve))
        return max(1, self.max_inflight - kept)

    def describe(self) -> dict[str, Any]:
        """The scenario as results record it."""
        return {
            "nodes": self.nodes,
            "max_inflight": self.max_inflight,
            "tokens_per_s": self.tokens_per_s,
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
            "loops": self.loops,
            "high_fraction": self.high_fraction,
            "high_rate_rps": self.high_rate_rps,
            "capacity_rps": self.capacity_rps,
            "slots": self.slots,
            "offered": self.offered,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "reserve": self.reserve,
            "normal_slots": self.normal_slots(self.reserve),
            "replicas": self.replicas,
            "client_timeout_s": self.client_timeout_s,
        }


@dataclass(frozen=True, slots=True)
class HighArrival:
    """One high-priority request: when it is sent (s after the start), its answer's length and
    the gateway replica it goes to."""

    at: float
    tokens: int
    replica: int


def high_schedule(seed: int, scenario: AdmissionScenario) -> list[HighArrival]:
    """The run's high-priority arrivals: a Poisson process at ``high_rate_rps`` over the run."""
    rng = random.Random(f"admission-high-{seed}")
    out: list[HighArrival] = []
    at = rng.expovariate(scenario.high_rate_rps)
    while at < scenario.duration_s:
        tokens = rng.randint(scenario.min_tokens, scenario.max_tokens)
        out.append(HighArrival(at, tokens, rng.randrange(scenario.replicas)))
        at += rng.expovariate(scenario.high_rate_rps)
    return out


def loop_lengths(seed: int, key: str, index: int) -> random.Random:
    """The answer lengths of one client loop, drawn from its own seeded generator."""
    return random.Random(f"admission-{key}-{index}-{seed}")
