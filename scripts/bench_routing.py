"""Routing quality of fleetgate: strategies, shared vs private replica state, cost by fleet
size, and failure drills, on simulated nodes of unequal capacity.

Why: N gateway replicas that keep their routing state private (LMDeploy's proxy, most
peers) each see 1/N of the load, so a load-aware strategy on each of them believes the fast
nodes are idle and they all herd onto them. fleetgate's replicas share their state in Redis.
This script measures what that is worth, and what each strategy is worth, with numbers
anyone can reproduce on one machine.

Everything runs as subprocesses on free loopback ports: a throwaway ``redis-server``,
simulated nodes (``python -m gateway.sim.node``: continuous batching with a waiting queue) of
unequal capacity, gateway replicas (``python -m gateway``) and, where they share Redis, one
health-checker (``python -m gateway.checker.health_checker``). By default there are two fast
nodes (1 slot x 320 tokens/s, 10 ms prefill) and two slow ones (1 slot x 160 tokens/s, 20 ms
prefill); ``--nodes`` changes them. Each node is registered with ``speed`` = slots x tokens/s
through ``POST /nodes/add`` (on every replica when stores are private).

Load: open loop. Arrivals are a Poisson process at ``--load`` (default 0.7) of the fleet's
capacity in requests/s, computed from the nodes' slots, tokens/s, prefill and the mean
output length, conditioned on its expected count so that every run offers exactly that load;
each request is sent at its arrival time whatever is still in flight. Output lengths
(``max_tokens``) are drawn from a seeded lognormal (median 32 tokens, sigma 0.5, capped at
128); half of the requests stream (SSE). Each request goes to a replica drawn uniformly at
random, as an L4 balancer spreads connections, and carries the ``X-Session-ID`` of one of 64
conversations (what ``session_affinity`` keys on). For the weighted strategies each node is
registered with its speed relative to the slowest node's as its weight. Run r uses seed
``--seed + r`` for every set-up, so set-ups are compared on the very same arrivals (common
random numbers). Latency is from the scheduled arrival to the last byte; time to first token
(TTFT) is to the first token event of a stream. Requests arriving in the first
``--warmup`` seconds are sent but not counted.

Parts (``--parts``, all by default):

* ``compare``: every strategy with 4 replicas sharing Redis; ``min_expected_latency`` and
  ``min_observed_latency`` also with 1 replica (on Redis) and with 4 replicas each on its own
  embedded store (the LMDeploy situation). Mean, p50, p90, p99 latency, TTFT p50/p99,
  errors and each node's share of the answers, medians of ``--runs`` runs.
* ``scale``: one replica on Redis with 4, 16, 64 and 256 registered nodes (one instant
  simulated node listening on 256 loopback ports, so every node id is a distinct URL) at a
  fixed ``--scale-rate``: gateway CPU per request (``/proc/<pid>/stat``), Redis CPU per
  request (``INFO cpu``), script calls per request and server time per call (``INFO
  commandstats``).
* ``drills``: (1) kill -9 a fast node mid-run, with 4 shared replicas and the health-checker
  (``--interval 0.5 --fall 2 --timeout 0.5``), then again with 4 private replicas (no
  checker possible: only passive ejection): failed requests, when each replica last tried
  the dead node (from each replica's ``fleetgate_upstream_attempts_total``), and the
  latencies and errors of the rest. The drills run at ``--drill-load`` (default 0.5) of the
  full fleet, so that the survivors can carry it. (2) kill -9 one of 4 shared replicas
  running with ``--lease-seconds 3`` while it has requests in flight (the L4 balancer stops
  sending to it at once): the requests cut, how long its leases stayed in Redis, when
  ``/nodes/replicas`` dropped it, and that ``/nodes/status`` came back to ``unfinished`` 0.

Targets (printed with "holds" or "MISSED"; the exit status is 0 either way, non-zero only
when something failed to start): at 70% load, 4 sharing replicas within 5% of 1 replica's
mean latency and at least 10% better than 4 private replicas, for both latency strategies;
``min_expected_latency`` better than ``random`` and ``round_robin``; per-request gateway and
Redis CPU at 256 nodes at most 1.25x that at 64 (flat past the 32-candidate full-scan limit).
Two set-ups are compared run by run, on the same arrivals: the figure is the median of the
per-run ratios of their mean latencies (the table shows the medians of each set-up's runs).

Outputs: a table and one JSON line on stdout (progress on stderr) and, in ``--out``
(default ``docs/benchmarks``; nothing is written with ``--quick`` unless ``--out`` is
given): ``results.json`` (every run), ``results.md`` (the figures, the command, the date),
and the charts ``latency.png``, ``shares.png``, ``scale.png`` and ``drill.png`` (needs
matplotlib: ``pip install -e ".[bench]"``). The default set takes about 8 minutes on
2 cores; ``--quick`` is a smoke run of about 2 minutes. ``--replot results.json`` redraws
the charts and results.md from saved figures.

    python scripts/bench_routing.py [--quick] [--runs 3] [--seed 1] [--duration 8]
                                    [--load 0.7] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scripts.bench.harness import RedisServer, free_port, script_stats
from shared_state.schema import KeySchema

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
HEADERS = {"Content-Type": "application/json"}
MESSAGES = [{"role": "user", "content": "Tell me about load balancing."}]
START_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 120.0
ERROR_SAMPLES = 4

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
SCALE_SIZES = (4, 16, 64, 256)
FULL_SCAN_LIMIT = 32  # shared_state.store.StoreSettings.full_scan_limit

# Log lines that are expected and not worth reporting.
EXPECTED_LOG = (
    "using the embedded in-process store",
    "fleetgate: gateway ",
    "fleetgate: health-checker ",
)


# -- scenario ----------------------------------------------------------------------------------


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
        return self.prefill_ms / 1000 + mean_tokens / self.tokens_per_s

    def capacity_rps(self, mean_tokens: float) -> float:
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


def comparison_setups(quick: bool) -> list[Setup]:
    setups: list[Setup] = []
    others = ("random", "round_robin") if quick else OTHER_STRATEGIES
    setups += [Setup(s, 4, True) for s in others]
    for strategy in LATENCY_STRATEGIES[:1] if quick else LATENCY_STRATEGIES:
        setups += [Setup(strategy, 1, True), Setup(strategy, 4, True), Setup(strategy, 4, False)]
    return setups


@dataclass(frozen=True, slots=True)
class Arrival:
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


# -- processes ---------------------------------------------------------------------------------


class StartupError(Exception):
    """Something the benchmark needs did not start."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: stop at the next step and clean up."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


class Processes:
    """Subprocesses of this run, each logging to its own file; :meth:`close` stops them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self._files: list[IO[bytes]] = []
        self._seq = 0

    def start(self, name: str, argv: Sequence[str], port: int = 0) -> Child:
        self._seq += 1
        log = self.log_dir / f"{self._seq:04d}-{name}.log"
        out = log.open("wb")
        self._files.append(out)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT, env=env
        )
        child = Child(name, proc, log, port)
        self.children.append(child)
        return child

    def wait_port(self, child: Child, timeout_s: float = START_TIMEOUT_S) -> None:
        import socket

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not child.alive():
                raise StartupError(
                    f"{child.name} exited with status {child.proc.returncode}:\n{child.tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", child.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.03)
        raise StartupError(f"{child.name} does not listen on port {child.port}:\n{child.tail()}")

    def stop(self, children: Iterable[Child], timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; all at once, then wait for each."""
        children = list(children)
        for child in children:
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
        for child in children:
            try:
                child.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(timeout=10)

    def kill(self, child: Child) -> None:
        """kill -9: what a crash looks like to everyone else."""
        if child.alive():
            child.proc.kill()
            child.proc.wait(timeout=10)

    def close(self) -> None:
        self.stop(reversed(self.children))
        for f in self._files:
            f.close()


def log_findings(children: Iterable[Child]) -> list[str]:
    """Warnings, errors and tracebacks children logged, minus the expected ones."""
    marks = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
    found: list[str] = []
    for child in children:
        for line in child.text().splitlines():
            if any(m in line for m in marks) and not any(e in line for e in EXPECTED_LOG):
                found.append(f"{child.name}: {line.strip()}")
    return found


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # After "pid (comm) ", fields start at "state" (field 3): utime is 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the harness -------------------------------------------------------------------------------


class Harness:
    """Redis, the simulated nodes, and starting and stopping gateways and checkers."""

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args = args
        self.procs = Processes(log_dir)
        self.redis_server: RedisServer | None = None
        self.redis: aioredis.Redis | None = None
        self.nodes: dict[str, tuple[NodeSpec, Child]] = {}
        self.py = sys.executable
        self.keys = KeySchema()
        self.interrupted = False

    def check(self) -> None:
        """Raise :class:`Interrupted` once a signal asked to stop (between steps: a
        cancellation alone can be lost in ``wait_for`` on Python 3.11)."""
        if self.interrupted:
            raise Interrupted

    @property
    def redis_url(self) -> str:
        assert self.redis_server is not None
        return self.redis_server.url

    @property
    def r(self) -> aioredis.Redis:
        assert self.redis is not None
        return self.redis

    def start_redis(self) -> None:
        self.redis_server = RedisServer().start()
        self.redis = aioredis.Redis.from_url(self.redis_url, decode_responses=True)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
        self.procs.close()
        if self.redis_server is not None:
            self.redis_server.close()

    def start_node(self, spec: NodeSpec, port: int | None = None) -> Child:
        port = port or free_port()
        argv = [self.py, "-m", "gateway.sim.node", "--port", str(port), "--model", MODEL]
        argv += ["--slots", str(spec.slots), "--tokens-per-s", str(spec.tokens_per_s)]
        argv += ["--prefill-ms", str(spec.prefill_ms), "--name", spec.name]
        child = self.procs.start(f"node-{spec.name}", argv, port)
        self.procs.wait_port(child)
        self.nodes[spec.name] = (spec, child)
        return child

    def start_gateways(self, setup: Setup, *, lease_s: float = 30.0, tag: str = "") -> list[Child]:
        children = []
        for i in range(setup.replicas):
            port = free_port()
            argv = [self.py, "-m", "gateway", "--port", str(port), "--strategy", setup.strategy]
            argv += ["--replica-id", f"gw-{i}", "--lease-seconds", f"{lease_s:g}"]
            argv += ["--shutdown-timeout", "2", "--log-level", "warning"]
            if setup.shared:
                argv += ["--redis-url", self.redis_url]
            name = f"gw-{i}-{setup.key.replace('/', '-')}{tag}"
            children.append(self.procs.start(name, argv, port))
        for child in children:
            self.procs.wait_port(child)
        return children

    def start_checker(self) -> Child:
        argv = [self.py, "-m", "gateway.checker.health_checker", "--redis-url", self.redis_url]
        argv += ["--interval", "0.5", "--fall", "2", "--rise", "2", "--timeout", "0.5"]
        argv += ["--deregister-after", "0", "--generate-every", "0", "--log-level", "warning"]
        return self.procs.start("checker", argv)

    async def reset_redis(self) -> None:
        await self.r.flushall()
        await self.r.config_resetstat()

    async def register(
        self, session: aiohttp.ClientSession, gateways: Sequence[Child], strategy: str = ""
    ) -> None:
        """Register every node with its speed through /nodes/add on each given gateway; for
        a weighted strategy also with a weight, its capacity relative to the slowest node's
        (as an operator sets them: other strategies keep weight 1, as ``random`` is weighted
        by speed and weight already)."""
        slowest = min(spec.speed for spec, _node in self.nodes.values())
        for gw in gateways:
            for spec, node in self.nodes.values():
                payload: dict[str, Any] = {
                    "url": node.url,
                    "status": {"models": [MODEL], "speed": spec.speed},
                }
                if strategy.startswith("weighted_"):
                    payload["weight"] = spec.speed / slowest
                async with session.post(gw.url + "/nodes/add", json=payload) as resp:
                    if resp.status != 200:
                        text = await resp.text()
                        raise StartupError(f"{gw.name}: /nodes/add answered {resp.status}: {text}")

    async def wait_ready(
        self, session: aiohttp.ClientSession, gateways: Sequence[Child], nodes: int
    ) -> None:
        """Wait until every gateway sees all ``nodes`` active (it follows the registry)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for gw in gateways:
            while True:
                async with session.get(gw.url + "/nodes/status") as resp:
                    status = await resp.json() if resp.status == 200 else {}
                active = sum(1 for v in status.values() if v.get("state") == "active")
                if active >= nodes:
                    async with session.get(gw.url + "/v1/models") as resp:
                        listing = await resp.json()
                    if any(m.get("id") == MODEL for m in listing.get("data", [])):
                        break
                if time.monotonic() > deadline or not gw.alive():
                    raise StartupError(f"{gw.name} never saw {nodes} active nodes:\n{gw.tail()}")
                await asyncio.sleep(0.05)

    async def sim_stats(self, session: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
        out = {}
        for name, (_spec, node) in self.nodes.items():
            if node.alive():
                async with session.get(node.url + "/sim/stats") as resp:
                    out[name] = await resp.json()
        return out

    async def wait_nodes_idle(self, session: aiohttp.ClientSession, timeout_s: float = 60) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = await self.sim_stats(session)
            if all(s["running"] == 0 and s["waiting"] == 0 for s in stats.values()):
                return True
            await asyncio.sleep(0.1)
        return False

    def node_names(self) -> dict[str, str]:
        """Node URL -> name, as the gateways name nodes in ``x-fleetgate-node``."""
        return {node.url: name for name, (_spec, node) in self.nodes.items()}


# -- load --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    at: float  # scheduled arrival, s after the start of the run
    stream: bool
    tokens: int
    replica: int
    chat: int = 0
    ok: bool = False
    error: str = ""
    detail: str = ""
    latency: float = math.nan  # s, arrival to last byte
    ttft: float = math.nan  # s, arrival to the first token event (streams)
    lag: float = 0.0  # s the load generator was late sending it
    node: str = ""
    end: float = math.nan  # s after the start of the run


async def _read_stream(
    resp: aiohttp.ClientResponse, res: Result, start: float, loop: asyncio.AbstractEventLoop
) -> None:
    tail = b""
    done = False
    events = 0
    async for chunk in resp.content.iter_any():
        parts = (tail + chunk).split(b"\n\n")
        tail = parts.pop()
        for part in parts:
            if part == b"data: [DONE]":
                done = True
            elif part.startswith(b'data: {"error"'):
                res.error, res.detail = "SSE error event", part[:300].decode("utf-8", "replace")
            elif part.startswith(b"data:"):
                events += 1
                if events == 1:
                    res.ttft = loop.time() - start
    if res.error:
        return
    if not done:
        res.error, res.detail = "stream without [DONE]", f"{events} events"
    elif events != res.tokens + 1:  # one per token and the one with finish_reason
        res.error, res.detail = "wrong stream length", f"{events} events for {res.tokens}"


async def send(
    session: aiohttp.ClientSession, base: str, res: Result, start: float, t0: float
) -> None:
    """One request; fills ``res``. ``start`` is its scheduled time on the loop clock."""
    loop = asyncio.get_running_loop()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": res.tokens, "stream": res.stream}
    headers = {"X-Session-ID": f"chat-{res.chat}"}
    try:
        async with session.post(base + CHAT_PATH, json=body, headers=headers) as resp:
            res.node = resp.headers.get("x-fleetgate-node", "")
            if resp.status != 200:
                text = await resp.read()
                res.error, res.detail = f"HTTP {resp.status}", text[:300].decode("utf-8", "replace")
            elif res.stream:
                await _read_stream(resp, res, start, loop)
            else:
                data = await resp.json()
                got = data.get("usage", {}).get("completion_tokens")
                if got != res.tokens:
                    res.error, res.detail = "wrong length", f"{got} tokens for {res.tokens}"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        res.error, res.detail = type(exc).__name__, str(exc)[:300]
    now = loop.time()
    res.end = now - t0
    if not res.error:
        res.ok = True
        res.latency = now - start


async def drive(
    session: aiohttp.ClientSession,
    schedule: Sequence[Arrival],
    choose: Callable[[Arrival], tuple[int, str]],
    t0: float,
) -> list[Result]:
    """Open loop: each arrival is sent at ``t0 + at`` (loop clock), whatever is in flight."""
    loop = asyncio.get_running_loop()
    results: list[Result] = []

    async def one(arrival: Arrival) -> None:
        start = t0 + arrival.at
        delay = start - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        index, base = choose(arrival)
        res = Result(arrival.at, arrival.stream, arrival.tokens, index, arrival.chat)
        res.lag = loop.time() - start
        results.append(res)
        await send(session, base, res, start, t0)

    tasks = [asyncio.ensure_future(one(a)) for a in schedule]
    gathered = asyncio.gather(*tasks)
    gathered.add_done_callback(_retrieve)  # when interrupted, nobody else will look at it
    span = schedule[-1].at if schedule else 0.0
    try:
        await asyncio.wait_for(gathered, timeout=span + REQUEST_TIMEOUT_S + 30)
    finally:
        for task in tasks:
            task.cancel()
    return results


def _retrieve(future: asyncio.Future[Any]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        future.exception()


def uniform_choice(bases: Sequence[str]) -> Callable[[Arrival], tuple[int, str]]:
    def choose(arrival: Arrival) -> tuple[int, str]:
        i = min(int(arrival.u * len(bases)), len(bases) - 1)
        return i, bases[i]

    return choose


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(
    results: Sequence[Result], lo: float, hi: float, names: dict[str, str]
) -> dict[str, Any]:
    """Figures of the requests that arrived in [lo, hi): latencies in ms, shares in 0..1."""
    measured = [r for r in results if lo <= r.at < hi]
    ok = [r for r in measured if r.ok]
    lat = [r.latency * 1000 for r in ok]
    ttft = [r.ttft * 1000 for r in ok if r.stream]
    errors = Counter(r.error for r in measured if not r.ok)
    samples = [f"{r.error}: {r.detail}" for r in measured if not r.ok][:ERROR_SAMPLES]
    by_node = Counter(names.get(r.node, r.node or "?") for r in ok)
    node_lat: dict[str, list[float]] = {name: [] for name in names.values()}
    for r in ok:
        node_lat.setdefault(names.get(r.node, r.node or "?"), []).append(r.latency * 1000)
    return {
        "requests": len(measured),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "error_samples": samples,
        "mean_ms": statistics.fmean(lat) if lat else math.nan,
        "p50_ms": quantile(lat, 0.5),
        "p90_ms": quantile(lat, 0.9),
        "p99_ms": quantile(lat, 0.99),
        "ttft_p50_ms": quantile(ttft, 0.5),
        "ttft_p99_ms": quantile(ttft, 0.99),
        "shares": {name: by_node.get(name, 0) / len(ok) if ok else 0.0 for name in names.values()},
        "node_mean_ms": {k: statistics.fmean(v) if v else math.nan for k, v in node_lat.items()},
        "max_lag_ms": max((r.lag * 1000 for r in measured), default=0.0),
    }


NUMERIC = (
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "errors",
    "requests",
    "max_lag_ms",
)


def median_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in NUMERIC}
    out["shares"] = {
        name: statistics.median(r["shares"][name] for r in runs) for name in runs[0]["shares"]
    }
    kinds: Counter[str] = Counter()
    for r in runs:
        kinds.update(r["error_kinds"])
    out["error_kinds_total"] = dict(kinds)
    out["error_samples"] = [s for r in runs for s in r["error_samples"]][:ERROR_SAMPLES]
    return out


def _session(limit: int = 0) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=timeout)


# -- part 1: strategies and replica set-ups ----------------------------------------------------


@dataclass
class Scenario:
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
        return (self.load if load is None else load) * self.capacity_rps

    def describe(self) -> dict[str, Any]:
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


async def run_setup(
    h: Harness, session: aiohttp.ClientSession, setup: Setup, schedule: Sequence[Arrival]
) -> tuple[dict[str, Any], list[str]]:
    """Start the set-up's gateways (and checker), drive one schedule, stop them."""
    args = h.args
    started: list[Child] = []
    h.check()
    try:
        if setup.shared:
            await h.reset_redis()
            started.append(h.start_checker())
        gateways = h.start_gateways(setup)
        started += gateways
        await h.register(session, gateways if not setup.shared else gateways[:1], setup.strategy)
        await h.wait_ready(session, gateways, len(h.nodes))
        for _spec, node in h.nodes.values():
            async with session.post(node.url + "/sim/reset") as resp:
                await resp.read()
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1
        results = await drive(session, schedule, uniform_choice([g.url for g in gateways]), t0)
        idle = await h.wait_nodes_idle(session)
        summary = summarize(results, args.warmup, args.warmup + args.duration, h.node_names())
        summary["nodes_idle_after"] = idle
        dead = [c.name for c in started if not c.alive()]
        if dead:
            summary["died"] = dead
    finally:
        h.procs.stop(started)
    return summary, log_findings(started)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def compare(h: Harness, scenario: Scenario) -> dict[str, Any]:
    args = h.args
    setups = comparison_setups(args.quick)
    if args.only:
        setups = [s for s in setups if any(word in s.key for word in args.only)]
    per_setup: dict[str, list[dict[str, Any]]] = {s.key: [] for s in setups}
    findings: dict[str, list[str]] = {s.key: [] for s in setups}
    span = args.warmup + args.duration
    async with _session() as session:
        for run in range(args.runs):
            seed = args.seed + run
            schedule = make_schedule(
                seed, scenario.rate(), span, scenario.lengths, scenario.stream_fraction
            )
            for setup in setups:
                t = time.monotonic()
                summary, found = await run_setup(h, session, setup, schedule)
                summary["seed"] = seed
                per_setup[setup.key].append(summary)
                findings[setup.key] += found
                _progress(
                    f"run {run + 1}/{args.runs} {setup.strategy:<21} {setup.mode:<10} "
                    f"mean {summary['mean_ms']:7.1f} ms  p99 {summary['p99_ms']:7.1f} ms  "
                    f"errors {summary['errors']}  ({time.monotonic() - t:.1f} s)"
                )
    out: dict[str, Any] = {}
    for setup in setups:
        runs = per_setup[setup.key]
        out[setup.key] = {
            "strategy": setup.strategy,
            "mode": setup.mode,
            "replicas": setup.replicas,
            "shared": setup.shared,
            "median": median_summary(runs),
            "runs": runs,
            "log_findings": findings[setup.key][:20],
            "log_findings_count": len(findings[setup.key]),
        }
    return out


# -- part 2: cost by fleet size ----------------------------------------------------------------


def serve_instant_nodes(count: int) -> int:
    """One instant simulated node listening on ``count`` loopback ports (distinct node URLs)."""
    from aiohttp import web

    from gateway.sim.node import NODE_KEY, SimConfig, build_app

    async def main() -> None:
        app = build_app(SimConfig(models=(MODEL,), slots=1 << 16, tokens_per_s=0.0))
        app[NODE_KEY].name = "instant"
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for _ in range(count):
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        ports = [addr[1] for addr in runner.addresses]
        print(json.dumps({"ports": ports}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


async def _redis_counters(r: aioredis.Redis) -> dict[str, float]:
    """Redis CPU seconds, and script calls and their time."""
    cpu = await r.info("cpu")
    calls, usec = await script_stats(r)
    return {
        "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        "script_calls": calls,
        "script_usec": usec,
    }


async def scale(h: Harness) -> dict[str, Any]:
    args = h.args
    sizes = (4, 64) if args.quick else SCALE_SIZES
    here = str(ROOT / "scripts" / "bench_routing.py")
    helper = h.procs.start("instant-nodes", [h.py, here, "--serve-instant-nodes", str(max(sizes))])
    ports: list[int] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ports:
        for line in helper.text().splitlines():
            if line.startswith('{"ports"'):
                ports = json.loads(line)["ports"]
        if not ports:
            if time.monotonic() > deadline or not helper.alive():
                raise StartupError(f"instant nodes did not start:\n{helper.tail()}")
            await asyncio.sleep(0.05)
    from shared_state import Store

    out: dict[str, Any] = {"sizes": {}, "rate_rps": args.scale_rate}
    setup = Setup("min_expected_latency", 1, True)
    async with _session() as session:
        for size in sizes:
            h.check()
            await h.reset_redis()
            store = Store.open(h.redis_url, timeout_s=5.0)
            try:
                for i, port in enumerate(ports[:size]):
                    url = f"http://127.0.0.1:{port}"
                    await store.add_node(url, [MODEL], speed=float(1 + i % 3))
            finally:
                await store.close()
            gateways = h.start_gateways(setup, tag=f"-scale{size}")
            gw = gateways[0]
            runs: list[dict[str, float]] = []
            try:
                await h.wait_ready(session, gateways, size)
                choose = uniform_choice([gw.url])
                loop = asyncio.get_running_loop()
                lengths = Lengths(16, 1e-9, 16)  # always 16 tokens, instant
                warm = make_schedule(args.seed, args.scale_rate, 1.0, lengths, 0.0)
                await drive(session, warm, choose, loop.time() + 0.05)
                for run in range(args.runs):
                    h.check()
                    schedule = make_schedule(
                        args.seed + run, args.scale_rate, args.scale_duration, lengths, 0.0
                    )
                    cpu0, red0 = proc_cpu_s(gw.proc.pid), await _redis_counters(h.r)
                    results = await drive(session, schedule, choose, loop.time() + 0.05)
                    cpu1, red1 = proc_cpu_s(gw.proc.pid), await _redis_counters(h.r)
                    served = sum(1 for r in results if r.ok)
                    n = max(served, 1)
                    calls = red1["script_calls"] - red0["script_calls"]
                    runs.append(
                        {
                            "requests": len(results),
                            "served": served,
                            "gateway_cpu_ms_per_req": (cpu1 - cpu0) * 1000 / n,
                            "redis_cpu_us_per_req": (red1["cpu_s"] - red0["cpu_s"]) * 1e6 / n,
                            "script_calls_per_req": calls / n,
                            "script_us_per_call": (red1["script_usec"] - red0["script_usec"])
                            / max(calls, 1),
                            "p50_ms": quantile([r.latency * 1000 for r in results if r.ok], 0.5),
                        }
                    )
                    _progress(
                        f"scale {size:>3} nodes run {run + 1}/{args.runs}: gateway "
                        f"{runs[-1]['gateway_cpu_ms_per_req']:.3f} ms CPU/req, redis "
                        f"{runs[-1]['redis_cpu_us_per_req']:.1f} us CPU/req, "
                        f"{served}/{len(results)} served"
                    )
            finally:
                h.procs.stop(gateways)
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            out["sizes"][str(size)] = {"median": med, "runs": runs}
    h.procs.stop([helper])
    return out


# -- part 3: failure drills --------------------------------------------------------------------

_ATTEMPTS = re.compile(
    r'^fleetgate_upstream_attempts_total\{node="([^"]*)",result="([^"]*)"\} (\S+)'
)
_SIMPLE = re.compile(
    r"^(fleetgate_retries_total|fleetgate_stream_errors_total\S*|"
    r"fleetgate_ejections_total\S*) (\S+)"
)


async def gateway_metrics(session: aiohttp.ClientSession, gw: Child) -> dict[str, float]:
    """Attempts per node ("attempts:<node>") and a few counters from one replica's /metrics."""
    out: dict[str, float] = {}
    try:
        async with session.get(gw.url + "/metrics") as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return out
    for line in text.splitlines():
        if m := _ATTEMPTS.match(line):
            key = f"attempts:{m.group(1)}"
            out[key] = out.get(key, 0.0) + float(m.group(3))
        elif m := _SIMPLE.match(line):
            name = m.group(1).split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(m.group(2))
    return out


def _window(results: Sequence[Result], lo: float, hi: float) -> dict[str, Any]:
    part = [r for r in results if lo <= r.at < hi]
    ok = [r.latency * 1000 for r in part if r.ok]
    return {
        "requests": len(part),
        "errors": sum(1 for r in part if not r.ok),
        "p50_ms": quantile(ok, 0.5),
        "p99_ms": quantile(ok, 0.99),
    }


async def drill_node_kill(
    h: Harness, scenario: Scenario, victim_name: str, shared: bool
) -> dict[str, Any]:
    """kill -9 one node mid-run; who still tried it, and for how long; what failed."""
    args = h.args
    setup = Setup("min_expected_latency", 4, shared)
    span = args.drill_duration
    kill_at = span / 3
    schedule = make_schedule(
        args.seed, scenario.rate(args.drill_load), span, scenario.lengths, scenario.stream_fraction
    )
    spec, victim = h.nodes[victim_name]
    h.check()
    started: list[Child] = []
    timeline: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    async with _session() as session:
        try:
            if shared:
                await h.reset_redis()
                started.append(h.start_checker())
            gateways = h.start_gateways(setup, tag="-drill-node")
            started += gateways
            await h.register(session, gateways if not shared else gateways[:1])
            await h.wait_ready(session, gateways, len(h.nodes))
            t0 = loop.time() + 0.1

            async def watch() -> None:
                async with _session() as ws:
                    await asyncio.sleep(t0 + kill_at - loop.time())
                    before = [await gateway_metrics(ws, g) for g in gateways]
                    stats = (await h.sim_stats(ws)).get(victim_name, {})
                    h.procs.kill(victim)
                    t_kill = loop.time() - t0
                    key = f"attempts:{victim.url}"
                    base = [m.get(key, 0.0) for m in before]
                    last = list(base)
                    last_attempt = [math.nan] * len(gateways)
                    events: list[list[float]] = []  # [s after start, replica, attempts seen]
                    unhealthy_at = ejected_at = math.nan
                    while loop.time() < t0 + span + 2:
                        await asyncio.sleep(0.1)
                        now = loop.time() - t0
                        for i, g in enumerate(gateways):
                            value = (await gateway_metrics(ws, g)).get(key, 0.0)
                            if value != last[i]:
                                events.append([round(now, 2), i, value - last[i]])
                                last[i], last_attempt[i] = value, now
                        if shared and math.isnan(unhealthy_at):
                            async with ws.get(gateways[1].url + "/nodes/status") as resp:
                                entry = (await resp.json()).get(victim.url, {})
                            if entry.get("state") == "unhealthy":
                                unhealthy_at = now
                            if math.isnan(ejected_at) and entry.get("ejected_until_ms", 0) > 0:
                                ejected_at = now
                    after = [await gateway_metrics(ws, g) for g in gateways]
                    timeline.update(
                        {
                            "kill_at_s": t_kill,
                            "in_flight_on_victim_at_kill": stats.get("running", 0)
                            + stats.get("waiting", 0),
                            "attempts_after_kill_per_replica": [
                                last[i] - base[i] for i in range(len(gateways))
                            ],
                            "last_attempt_after_kill_s": [
                                (t - t_kill) if not math.isnan(t) else None for t in last_attempt
                            ],
                            "attempt_events": events,
                            "unhealthy_after_s": unhealthy_at - t_kill,
                            "ejected_seen_after_s": ejected_at - t_kill,
                            "retries": sum(a.get("fleetgate_retries_total", 0.0) for a in after),
                            "ejections": sum(
                                a.get("fleetgate_ejections_total", 0.0) for a in after
                            ),
                            "stream_errors": sum(
                                a.get("fleetgate_stream_errors_total", 0.0) for a in after
                            ),
                        }
                    )

            watcher = asyncio.ensure_future(watch())
            choose = uniform_choice([g.url for g in gateways])
            results = await drive(session, schedule, choose, t0)
            await watcher
            survivors_idle = await h.wait_nodes_idle(session)
        finally:
            h.procs.stop(started)
            h.procs.kill(victim)
            del h.nodes[victim_name]
            h.start_node(spec, victim.port)  # back for the next drill, at the same URL
    t_kill = timeline["kill_at_s"]
    cut = [r for r in results if r.at < t_kill and r.end >= t_kill and not r.ok]
    after_kill = [r for r in results if r.at >= t_kill]
    last = [t for t in timeline["last_attempt_after_kill_s"] if t is not None]
    names = h.node_names()
    return {
        "mode": setup.mode,
        "victim": victim_name,
        "load": args.drill_load,
        "duration_s": span,
        **timeline,
        "requests": len(results),
        "failed": sum(1 for r in results if not r.ok),
        "failed_cut_at_kill": len(cut),
        "failed_after_kill": sum(1 for r in after_kill if not r.ok),
        "error_kinds": dict(Counter(r.error for r in results if not r.ok)),
        "answered_by_victim_after_kill": sum(
            1 for r in after_kill if r.ok and names.get(r.node) == victim_name
        ),
        "no_replica_routes_after_s": max(last) if last else 0.0,
        "before_kill": _window(results, 0.0, t_kill),
        "after_kill": _window(results, t_kill, span),
        "survivors_idle_after": survivors_idle,
        "points": [[round(r.at, 3), round(r.latency * 1000, 1) if r.ok else None] for r in results],
        "log_findings": log_findings(started)[:10],
    }


async def _live_leases_of(h: Harness, replica: str) -> tuple[int, int]:
    """Unexpired leases held by ``replica``, and by everyone, across all registered nodes."""
    sec, usec = await h.r.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    ids = sorted(str(i) for i in await h.r.smembers(h.keys.nodes))
    async with h.r.pipeline(transaction=False) as pipe:
        for node_id in ids:
            pipe.zrangebyscore(h.keys.leases(node_id), now_ms, "+inf")
        replies = await pipe.execute()
    members = [m for reply in replies for m in reply]
    return sum(1 for m in members if m.startswith(replica + ":")), len(members)


async def drill_replica_kill(h: Harness, scenario: Scenario) -> dict[str, Any]:
    """kill -9 one of 4 shared replicas mid-run: its leases must expire, counts return to 0."""
    args = h.args
    lease_s = args.drill_lease
    setup = Setup("min_expected_latency", 4, True)
    span = args.drill_duration
    kill_at = span / 3
    schedule = make_schedule(
        args.seed, scenario.rate(args.drill_load), span, scenario.lengths, scenario.stream_fraction
    )
    h.check()
    started: list[Child] = []
    timeline: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    async with _session() as session:
        try:
            await h.reset_redis()
            started.append(h.start_checker())
            gateways = h.start_gateways(setup, lease_s=lease_s, tag="-drill-replica")
            started += gateways
            await h.register(session, gateways[:1])
            await h.wait_ready(session, gateways, len(h.nodes))
            victim = gateways[0]
            alive = [True] * len(gateways)

            def choose(arrival: Arrival) -> tuple[int, str]:
                up = [i for i, a in enumerate(alive) if a]  # the L4 balancer drops the dead one
                i = up[min(int(arrival.u * len(up)), len(up) - 1)]
                return i, gateways[i].url

            t0 = loop.time() + 0.1

            async def watch() -> None:
                async with _session() as ws:
                    await asyncio.sleep(t0 + kill_at - loop.time())
                    # Kill it while it has requests in flight (at most 3 s later).
                    held, total = await _live_leases_of(h, "gw-0")
                    give_up = loop.time() + 3
                    while held < 2 and loop.time() < give_up:
                        await asyncio.sleep(0.02)
                        held, total = await _live_leases_of(h, "gw-0")
                    h.procs.kill(victim)
                    alive[0] = False
                    t_kill = loop.time() - t0
                    series: list[tuple[float, int, int]] = [(0.0, held, total)]
                    zero_at = replicas_at = math.nan
                    deadline = t0 + t_kill + lease_s * 2 + 3
                    while loop.time() < deadline:
                        await asyncio.sleep(0.05)
                        now = loop.time() - t0 - t_kill
                        mine, total = await _live_leases_of(h, "gw-0")
                        series.append((round(now, 3), mine, total))
                        if mine == 0 and math.isnan(zero_at):
                            zero_at = now
                        if math.isnan(replicas_at):
                            async with ws.get(gateways[1].url + "/nodes/replicas") as resp:
                                listed = (await resp.json()).get("replicas", {})
                            if "gw-0" not in listed:
                                replicas_at = now
                        if not math.isnan(zero_at) and not math.isnan(replicas_at):
                            break
                    timeline.update(
                        {
                            "kill_at_s": t_kill,
                            "leases_of_killed_replica_at_kill": held,
                            "leases_total_at_kill": total,
                            "leases_expired_after_s": zero_at,
                            "dropped_from_replicas_after_s": replicas_at,
                            "lease_series": series[:: max(1, len(series) // 60)],
                        }
                    )

            watcher = asyncio.ensure_future(watch())
            results = await drive(session, schedule, choose, t0)
            await watcher
            last_end = max((r.end for r in results if not math.isnan(r.end)), default=0.0)
            zero_after = math.nan
            unfinished: dict[str, int] = {}
            deadline = loop.time() + lease_s * 2 + 5
            while loop.time() < deadline:
                async with session.get(gateways[1].url + "/nodes/status") as resp:
                    status = await resp.json()
                unfinished = {url: int(v["unfinished"]) for url, v in status.items()}
                if sum(unfinished.values()) == 0:
                    zero_after = loop.time() - t0 - last_end
                    break
                await asyncio.sleep(0.05)
            idle = await h.wait_nodes_idle(session)
            async with session.get(gateways[1].url + "/nodes/replicas") as resp:
                replicas = (await resp.json()).get("replicas", {})
        finally:
            h.procs.stop(started)
    t_kill = timeline["kill_at_s"]
    through_victim = [r for r in results if r.replica == 0]
    after_kill = [r for r in results if r.at >= t_kill]
    return {
        "mode": setup.mode,
        "lease_s": lease_s,
        "load": args.drill_load,
        "duration_s": span,
        **timeline,
        "requests": len(results),
        "failed": sum(1 for r in results if not r.ok),
        "failed_through_killed_replica": sum(1 for r in through_victim if not r.ok),
        "failed_after_kill_elsewhere": sum(1 for r in after_kill if not r.ok and r.replica != 0),
        "error_kinds": dict(Counter(r.error for r in results if not r.ok)),
        "unfinished_zero_after_last_response_s": zero_after,
        "unfinished_at_end": unfinished,
        "replicas_at_end": sorted(replicas),
        "nodes_idle_after": idle,
        "before_kill": _window(results, 0.0, t_kill),
        "after_kill": _window(results, t_kill, span),
        "log_findings": log_findings(started)[:10],
    }


async def drills(h: Harness, scenario: Scenario) -> dict[str, Any]:
    victim = h.args.drill_victim
    out: dict[str, Any] = {}
    out["node_kill_shared"] = await drill_node_kill(h, scenario, victim, shared=True)
    _progress(_drill_line("node kill, 4 shared + checker", out["node_kill_shared"]))
    if not h.args.quick:
        out["node_kill_private"] = await drill_node_kill(h, scenario, victim, shared=False)
        _progress(_drill_line("node kill, 4 private", out["node_kill_private"]))
    out["replica_kill"] = await drill_replica_kill(h, scenario)
    d = out["replica_kill"]
    _progress(
        f"drill replica kill: {d['leases_of_killed_replica_at_kill']} leases orphaned, expired "
        f"after {d['leases_expired_after_s']:.2f} s; failed {d['failed']}"
    )
    return out


def _drill_line(title: str, d: dict[str, Any]) -> str:
    return (
        f"drill {title}: failed {d['failed']} of {d['requests']} "
        f"({d['failed_cut_at_kill']} cut at the kill), last attempt on the dead node "
        f"{d['no_replica_routes_after_s']:.2f} s after the kill"
    )


# -- targets and report ------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "holds" if ok else "MISSED"


def evaluate(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its measured figure and whether it holds.

    Two set-ups are compared run by run: in a run both got the same arrivals, so the ratio of
    their mean latencies in that run is free of what the arrivals did to both (one seed's
    burst can move every set-up by 20%, more than the differences sought). The figure is the
    median of those per-run ratios.
    """
    targets: dict[str, dict[str, Any]] = {}
    comp = result.get("comparison", {})

    def paired(name: str, a: str, b: str, goal: str, holds: Callable[[float], bool]) -> None:
        """Target ``name``: the median over runs of a's mean over b's in the same run, minus 1."""
        if a not in comp or b not in comp:
            return
        by_seed = {r.get("seed"): r["mean_ms"] for r in comp[b]["runs"]}
        ratios = [
            r["mean_ms"] / by_seed[r.get("seed")] - 1
            for r in comp[a]["runs"]
            if by_seed.get(r.get("seed"))
        ]
        if not ratios:
            return
        ratio = statistics.median(ratios)
        runs = ", ".join(f"{x:+.1%}" for x in ratios)
        targets[name] = {
            "figure": ratio,
            "text": f"mean {ratio:+.1%} (runs {runs}; target {goal})",
            "holds": holds(ratio),
        }

    for s in LATENCY_STRATEGIES:
        shared = f"{s}/4-shared"
        paired(
            f"{s}: 4 shared vs 1 replica",
            shared,
            f"{s}/1-replica",
            "within +-5%",
            lambda r: abs(r) <= 0.05,
        )
        paired(
            f"{s}: 4 shared vs 4 private",
            shared,
            f"{s}/4-private",
            "<= -10%",
            lambda r: r <= -0.10,
        )
    for other in ("random", "round_robin"):
        paired(
            f"min_expected_latency vs {other} (4 shared)",
            "min_expected_latency/4-shared",
            f"{other}/4-shared",
            "< 0",
            lambda r: r < 0,
        )
    sizes = result.get("scale", {}).get("sizes", {})
    if "64" in sizes and "256" in sizes:
        for key, label in (
            ("gateway_cpu_ms_per_req", "gateway CPU/request"),
            ("redis_cpu_us_per_req", "Redis CPU/request"),
        ):
            ratio = sizes["256"]["median"][key] / sizes["64"]["median"][key]
            targets[f"scale: {label} at 256 vs 64 nodes"] = {
                "figure": ratio,
                "text": f"{ratio:.2f}x (target <= 1.25x)",
                "holds": ratio <= 1.25,
            }
    return targets


def _ms(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def comparison_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    comp = result["comparison"]
    names = [n["name"] for n in result["scenario"]["nodes"]]
    head = ["strategy", "set-up", "mean ms", "p50 ms", "p90 ms", "p99 ms", "TTFT p50", "TTFT p99"]
    head += ["errors", *names, "mean of each run"]
    rows = []
    for row in comp.values():
        m = row["median"]
        rows.append(
            [
                row["strategy"],
                row["mode"],
                *(_ms(m[k]) for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms")),
                *(_ms(m[k]) for k in ("ttft_p50_ms", "ttft_p99_ms")),
                f"{m['errors']:g}",
                *(f"{m['shares'][n]:.0%}" for n in names),
                "/".join(f"{r['mean_ms']:.0f}" for r in row["runs"]),
            ]
        )
    capacity = ["capacity share", "", *[""] * 7]
    capacity += [f"{n['capacity_share']:.0%}" for n in result["scenario"]["nodes"]]
    capacity += [""]
    rows.append(capacity)
    return head, rows


def scale_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["nodes", "gateway CPU ms/req", "Redis CPU us/req", "scripts/req", "us/script call"]
    head += ["p50 ms"]
    rows = []
    for size, row in result["scale"]["sizes"].items():
        m = row["median"]
        rows.append(
            [
                size,
                f"{m['gateway_cpu_ms_per_req']:.3f}",
                f"{m['redis_cpu_us_per_req']:.1f}",
                f"{m['script_calls_per_req']:.2f}",
                f"{m['script_us_per_call']:.1f}",
                f"{m['p50_ms']:.2f}",
            ]
        )
    return head, rows


def _text_table(head: list[str], rows: list[list[str]], left: int = 2) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for r in [head, *rows]:
        cells = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _md_table(head: list[str], rows: list[list[str]], left: int = 2) -> str:
    align = [":--" if i < left else "--:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _s(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "never"
    return f"{value:.2f} s"


def drill_lines(result: dict[str, Any]) -> list[str]:
    d = result.get("drills", {})
    lines = []
    for key, title in (
        ("node_kill_shared", "4 replicas sharing Redis, health-checker every 0.5 s, fall 2"),
        ("node_kill_private", "4 replicas with private stores, no health-checker"),
    ):
        if key not in d:
            continue
        x = d[key]
        attempts = ", ".join(f"{a:g}" for a in x["attempts_after_kill_per_replica"])
        retried = (
            "none failed: each was retried on another node before the first byte"
            if x["failed_after_kill"] == 0
            else f"{x['failed_after_kill']} later arrivals failed"
        )
        if key == "node_kill_shared":
            ejected = x["ejected_seen_after_s"]
            detection = (
                "passive ejection (shared by all replicas through Redis) "
                + (
                    f"seen after {_s(ejected)}"
                    if ejected is not None
                    else "not seen (too few attempts on the node before the checker's verdict)"
                )
                + f"; marked unhealthy by the checker after {_s(x['unhealthy_after_s'])}"
            )
        else:
            detection = (
                f"no checker can reach private stores: {x['ejections']:g} passive ejections, "
                "each replica on its own after 5 consecutive failures, 5 s then doubling"
            )
        lines.append(
            f"kill -9 {x['victim']} at {x['kill_at_s']:.1f} s ({title}; load "
            f"{x['load']:.0%} of the full fleet): {x['failed']} of {x['requests']} requests "
            f"failed, {x['failed_cut_at_kill']} of them streams cut at the kill "
            f"({x['in_flight_on_victim_at_kill']} requests were on the node); attempts on the "
            f"dead node after the kill, per replica: {attempts} ({retried}; {x['retries']:g} "
            f"retries in all); last attempt {_s(x['no_replica_routes_after_s'])} after the "
            f"kill (watched for {x['duration_s'] - x['kill_at_s'] + 2:.0f} s); "
            f"{detection}; the rest carried on: after the kill p50 "
            f"{_ms(x['after_kill']['p50_ms'])} ms, p99 {_ms(x['after_kill']['p99_ms'])} ms "
            f"(before: {_ms(x['before_kill']['p50_ms'])} / {_ms(x['before_kill']['p99_ms'])}; "
            "the survivors carry the same load)"
        )
    if "replica_kill" in d:
        x = d["replica_kill"]
        lines.append(
            f"kill -9 replica gw-0 at {x['kill_at_s']:.1f} s (4 sharing Redis, --lease-seconds "
            f"{x['lease_s']:g}): {x['failed_through_killed_replica']} requests in flight "
            f"through it failed, {x['failed_after_kill_elsewhere']} failed elsewhere after the "
            f"kill; it held {x['leases_of_killed_replica_at_kill']} of "
            f"{x['leases_total_at_kill']} leases, all expired "
            f"{_s(x['leases_expired_after_s'])} after the kill; /nodes/replicas dropped it after "
            f"{_s(x['dropped_from_replicas_after_s'])}; /nodes/status unfinished back to 0 "
            f"{_s(x['unfinished_zero_after_last_response_s'])} after the last response "
            f"(nodes idle: {x['nodes_idle_after']})"
        )
    return lines


def print_report(result: dict[str, Any]) -> None:
    sc = result["scenario"]
    nodes = ", ".join(f"{n['name']} {n['slots']}x{n['tokens_per_s']:g} tok/s" for n in sc["nodes"])
    print(
        f"fleetgate routing benchmark: {nodes}; outputs lognormal median "
        f"{sc['lengths']['median']:g} (mean {sc['lengths']['mean']:.1f}, cap "
        f"{sc['lengths']['cap']}) tokens, {sc['stream_fraction']:.0%} streamed; load "
        f"{sc['load']:.0%} of {sc['capacity_rps']:.1f} req/s = {sc['rate_rps']:.1f} req/s; "
        f"medians of {result['runs']} run(s) of {result['duration_s']:g} s"
    )
    if "comparison" in result:
        print()
        print(_text_table(*comparison_rows(result)))
    if "scale" in result:
        print()
        print(
            f"cost by fleet size (1 replica, min_expected_latency, {result['scale']['rate_rps']:g}"
            " req/s, instant nodes)"
        )
        print(_text_table(*scale_rows(result), left=1))
    if "drills" in result:
        print()
        for line in drill_lines(result):
            print(line)
    print()
    for name, t in result["targets"].items():
        print(f"{name}: {t['text']}: {_verdict(t['holds'])}")
    found = {k: v for k, v in result.get("log_findings", {}).items() if v}
    for key, lines in found.items():
        print(f"{key}: {len(lines)} warning/error log line(s), first: {lines[0][:240]}")


def summary_line(result: dict[str, Any]) -> dict[str, Any]:
    line: dict[str, Any] = {
        "bench": "routing",
        "runs": result["runs"],
        "duration_s": result["duration_s"],
        "load": result["scenario"]["load"],
        "rate_rps": result["scenario"]["rate_rps"],
    }
    if "comparison" in result:
        line["comparison"] = {
            key: {
                "mean_ms": round(row["median"]["mean_ms"], 1),
                "p99_ms": round(row["median"]["p99_ms"], 1),
                "ttft_p50_ms": round(row["median"]["ttft_p50_ms"], 1),
                "errors": row["median"]["errors"],
                "shares": {k: round(v, 3) for k, v in row["median"]["shares"].items()},
            }
            for key, row in result["comparison"].items()
        }
    if "scale" in result:
        line["scale"] = {
            size: {
                "gateway_cpu_ms_per_req": round(row["median"]["gateway_cpu_ms_per_req"], 3),
                "redis_cpu_us_per_req": round(row["median"]["redis_cpu_us_per_req"], 1),
            }
            for size, row in result["scale"]["sizes"].items()
        }
    if "drills" in result:
        d = result["drills"]
        line["drills"] = {
            key: {
                k: d[key].get(k)
                for k in (
                    "failed",
                    "failed_cut_at_kill",
                    "no_replica_routes_after_s",
                    "unhealthy_after_s",
                    "leases_expired_after_s",
                    "unfinished_zero_after_last_response_s",
                )
                if k in d[key]
            }
            for key in d
        }
    line["targets"] = {k: t["holds"] for k, t in result["targets"].items()}
    line["all_targets_hold"] = all(line["targets"].values())
    line["elapsed_s"] = round(result["elapsed_s"], 1)
    cleaned: dict[str, Any] = _clean(line)
    return cleaned


def _clean(obj: Any) -> Any:
    """JSON without NaN: NaN becomes null, floats are rounded to 4 decimals."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, 4)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


# -- files: JSON, markdown, charts -------------------------------------------------------------


def write_markdown(result: dict[str, Any], out: Path, charts: list[str]) -> None:
    sc = result["scenario"]
    lines = [
        "# Routing benchmark",
        "",
        f"Measured on {result['date']} by `{result['command']}` "
        f"({result['elapsed_s'] / 60:.1f} minutes; {result['machine']['cpus']} CPUs, "
        f"{result['machine']['cpu_model']}, Python {result['machine']['python']}). "
        "Raw figures of every run: [results.json](results.json). "
        'Regenerate everything here with `pip install -e ".[bench]"` and '
        "`python scripts/bench_routing.py` (`--quick` for a smoke run that writes nothing; "
        "`--replot docs/benchmarks/results.json` redraws the charts without measuring).",
        "",
        "## Scenario",
        "",
        "Simulated nodes (`gateway.sim.node`, continuous batching with a waiting queue), "
        "registered with `speed` = slots x tokens/s:",
        "",
        _md_table(
            ["node", "slots", "tokens/s", "prefill ms", "speed", "capacity req/s", "share"],
            [
                [
                    n["name"],
                    str(n["slots"]),
                    f"{n['tokens_per_s']:g}",
                    f"{n['prefill_ms']:g}",
                    f"{n['speed']:g}",
                    f"{n['capacity_rps']:.2f}",
                    f"{n['capacity_share']:.0%}",
                ]
                for n in sc["nodes"]
            ],
            left=1,
        ),
        "",
        f"Open-loop Poisson arrivals at {sc['load']:.0%} of the fleet's capacity "
        f"({sc['rate_rps']:.1f} of {sc['capacity_rps']:.1f} req/s; exactly that many per "
        "second of each run: the process is conditioned on its expected count); output "
        "lengths lognormal, "
        f"median {sc['lengths']['median']:g} tokens, sigma {sc['lengths']['sigma']:g}, capped at "
        f"{sc['lengths']['cap']} (mean {sc['lengths']['mean']:.1f}); "
        f"{sc['stream_fraction']:.0%} of requests streamed; each request sent to a replica "
        "drawn uniformly at random (an L4 balancer), with an `X-Session-ID` of one of "
        f"{CHATS} conversations drawn uniformly (the keys of `session_affinity`); for the "
        "weighted strategies each node is registered with its speed relative to the slowest "
        "as its weight. Latency: scheduled arrival to last byte. "
        f"TTFT: to the first token event of a stream. Each figure is the median of "
        f"{result['runs']} runs of {result['duration_s']:g} s (after {result['warmup_s']:g} s "
        "of warm-up); every set-up gets the same arrivals in a given run.",
        "",
    ]
    if "comparison" in result:
        lines += [
            "## Strategies and replica set-ups",
            "",
            '"1 replica": one gateway on Redis. "4 shared": four gateways on one Redis '
            '(fleetgate). "4 private": four gateways, each on its own embedded store, each '
            "with every node registered (the LMDeploy-proxy situation). Shared set-ups run "
            "the health-checker. Node columns: share of the answered requests.",
            "",
            _md_table(*comparison_rows(result)),
            "",
        ]
    if result["targets"]:
        lines += [
            "## Targets",
            "",
            "Two set-ups are compared run by run, on the same arrivals: a latency figure is "
            "the median of the per-run ratios of their mean latencies, minus 1.",
            "",
            _md_table(
                ["target", "measured", "verdict"],
                [[k, t["text"], _verdict(t["holds"])] for k, t in result["targets"].items()],
                left=1,
            ),
            "",
        ]
    if "scale" in result:
        lines += [
            "## Cost by fleet size",
            "",
            f"One replica on Redis, `min_expected_latency`, {result['scale']['rate_rps']:g} req/s "
            "of 16-token requests to an instant simulated node listening on as many loopback "
            "ports as there are registered nodes. Gateway CPU from `/proc/<pid>/stat`, Redis "
            "CPU from `INFO cpu`, script calls and their server time from `INFO commandstats`, "
            f"per request served. Up to {FULL_SCAN_LIMIT} candidates are all scored; past that a "
            "random sample of 8 is.",
            "",
            _md_table(*scale_rows(result), left=1),
            "",
        ]
    if "drills" in result:
        lines += ["## Failure drills", ""]
        lines += [f"- {line}" for line in drill_lines(result)]
        lines += [""]
    if charts:
        lines += ["## Charts", ""]
        lines += [f"![{c}]({c})" for c in charts]
        lines += [""]
    (out / "results.md").write_text("\n".join(lines))


def _wrap(name: str) -> str:
    """A strategy name with a line break after each underscore, for chart labels."""
    return name.replace("_", "_\n")


def write_charts(result: dict[str, Any], out: Path) -> list[str]:
    """PNG charts; returns their file names (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _progress("matplotlib is not installed (pip install -e '.[bench]'): no charts")
        return []
    written: list[str] = []

    def save(fig: Any, name: str) -> str:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return name

    colors = {"1 replica": "#4c72b0", "4 shared": "#55a868", "4 private": "#c44e52"}
    if "comparison" in result:
        comp = result["comparison"]
        shared_rows = [r for r in comp.values() if r["mode"] == "4 shared"]
        setup_rows = [r for r in comp.values() if r["strategy"] in LATENCY_STRATEGIES]
        groups = [("Strategies, 4 replicas sharing Redis", shared_rows)]
        groups += [("Replica set-ups", setup_rows)]
        p99s = sorted(r["median"]["p99_ms"] for r in comp.values())
        # Outliers (round_robin) would flatten everything else: clip them, and say so.
        cap = min(p99s[-1], 3 * statistics.median(p99s)) * 1.12
        widths = [
            len(rows) + (len(rows) // 3 - 1 if i else 0) for i, (_t, rows) in enumerate(groups)
        ]
        fig, axes = plt.subplots(
            1, len(groups), figsize=(13, 5.4), squeeze=False, gridspec_kw={"width_ratios": widths}
        )
        for ax, (title, rows) in zip(axes[0], groups, strict=True):
            by_group = title.startswith("Replica")
            x = [i + (i // 3 if by_group else 0) for i in range(len(rows))]
            for xi, r in zip(x, rows, strict=True):
                m = r["median"]
                ax.bar(xi, min(m["mean_ms"], cap), color=colors[r["mode"]], alpha=0.85, width=0.7)
                ax.plot([xi, xi], [m["p50_ms"], min(m["p99_ms"], cap)], color="black", lw=1)
                ax.plot(xi, m["p50_ms"], "o", color="black", ms=4)
                if m["p90_ms"] <= cap:
                    ax.plot(xi, m["p90_ms"], "_", color="black", ms=12, mew=2)
                if m["p99_ms"] <= cap:
                    ax.plot(xi, m["p99_ms"], "v", color="black", ms=5)
                else:
                    ax.plot(xi, cap, "^", color="black", ms=6, clip_on=False)
                    ax.annotate(
                        f"p99 {m['p99_ms']:.0f}"
                        + (f"\np90 {m['p90_ms']:.0f}" if m["p90_ms"] > cap else ""),
                        (xi, cap),
                        ha="left",
                        va="top",
                        fontsize=7,
                        xytext=(5, -3),
                        textcoords="offset points",
                    )
                if m["mean_ms"] <= cap:
                    ax.annotate(
                        f"{m['mean_ms']:.0f}",
                        (xi, m["mean_ms"]),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                        xytext=(10, 1),
                        textcoords="offset points",
                    )
                else:
                    ax.text(
                        xi,
                        cap * 0.9,
                        f"mean\n{m['mean_ms']:.0f}",
                        ha="center",
                        va="top",
                        fontsize=7,
                        color="white",
                        fontweight="bold",
                    )
            if by_group:
                ax.set_xticks(x, [r["mode"] for r in rows], fontsize=8)
                for g in range(0, len(rows), 3):
                    center = sum(x[g : g + 3]) / len(x[g : g + 3])
                    ax.text(
                        center,
                        -0.09,
                        rows[g]["strategy"],
                        ha="center",
                        va="top",
                        fontsize=9,
                        transform=ax.get_xaxis_transform(),
                    )
            else:
                ax.set_xticks(x, [_wrap(r["strategy"]) for r in rows], fontsize=8)
            ax.set_ylim(0, cap)
            ax.set_title(title, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        axes = axes[0]
        axes[0].set_ylabel("latency to last byte, ms")
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles: list[Any] = [Patch(color=c, label=f"mean, {k}") for k, c in colors.items()]
        handles += [
            Line2D([], [], marker="o", color="black", ls="", ms=4, label="p50"),
            Line2D([], [], marker="_", color="black", ls="", ms=12, mew=2, label="p90"),
            Line2D([], [], marker="v", color="black", ls="", ms=5, label="p99"),
        ]
        axes[1].legend(handles=handles, fontsize=8, loc="upper left")
        sc = result["scenario"]
        fig.suptitle(
            f"Latency at {sc['load']:.0%} load ({sc['rate_rps']:.1f} req/s) on unequal nodes, "
            f"medians of {result['runs']} runs",
            fontsize=11,
        )
        written.append(save(fig, "latency.png"))

        names = [n["name"] for n in sc["nodes"]]
        palette = ["#1f77b4", "#6baed6", "#ff7f0e", "#fdae6b", "#2ca02c", "#98df8a"]
        rows = [("capacity", {n["name"]: n["capacity_share"] for n in sc["nodes"]})]
        rows += [(f"{r['strategy']} / {r['mode']}", r["median"]["shares"]) for r in comp.values()]
        rows.reverse()
        fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.4))
        for y, (_label, shares) in enumerate(rows):
            left = 0.0
            for j, name in enumerate(names):
                w = shares.get(name, 0.0)
                ax.barh(
                    y,
                    w,
                    left=left,
                    color=palette[j % len(palette)],
                    label=name if y == 0 else None,
                    edgecolor="white",
                )
                if w >= 0.06:
                    ax.text(left + w / 2, y, f"{w:.0%}", ha="center", va="center", fontsize=8)
                left += w
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of answered requests")
        ax.set_title(
            "Each node's share by strategy and set-up (top: share of capacity)", fontsize=10
        )
        ax.legend(ncol=len(names), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.06))
        written.append(save(fig, "shares.png"))
    if "scale" in result:
        sizes = result["scale"]["sizes"]
        xs = [int(s) for s in sizes]
        med = [sizes[s]["median"] for s in sizes]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        series = [
            (axes[0], "gateway_cpu_ms_per_req", "gateway CPU per request, ms", "#4c72b0"),
            (axes[1], "redis_cpu_us_per_req", "Redis CPU per request, us", "#c44e52"),
        ]
        for ax, key, label, color in series:
            for s, row in zip(xs, sizes.values(), strict=True):
                ax.plot(
                    [s] * len(row["runs"]),
                    [r[key] for r in row["runs"]],
                    ".",
                    color=color,
                    alpha=0.35,
                )
            ax.plot(xs, [m[key] for m in med], "o-", color=color, label="median")
            ax.axvline(FULL_SCAN_LIMIT, ls=":", color="gray")
            ax.text(
                FULL_SCAN_LIMIT * 1.05,
                0.05,
                "sampling\nbeyond 32",
                fontsize=8,
                color="gray",
                transform=ax.get_xaxis_transform(),
            )
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_ylim(0, max(m[key] for m in med) * 1.4)
            ax.set_xlabel("registered nodes")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[1].plot(
            xs,
            [m["script_us_per_call"] for m in med],
            "s--",
            color="#8172b2",
            label="server time per script call, us",
        )
        axes[1].legend(fontsize=8)
        fig.suptitle(
            f"Cost per request by fleet size (1 replica, {result['scale']['rate_rps']:g} req/s)",
            fontsize=11,
        )
        written.append(save(fig, "scale.png"))
    drills = result.get("drills", {})
    panels = [
        (k, t)
        for k, t in (
            ("node_kill_shared", "4 replicas sharing Redis + checker"),
            ("node_kill_private", "4 private replicas"),
        )
        if k in drills
    ]
    if panels:
        fig, axes = plt.subplots(
            1, len(panels), figsize=(6 * len(panels), 4.2), sharey=True, squeeze=False
        )
        for ax, (key, title) in zip(axes[0], panels, strict=True):
            d = drills[key]
            ok = [(p[0], p[1]) for p in d["points"] if p[1] is not None]
            bad = [p[0] for p in d["points"] if p[1] is None]
            ax.plot(
                [p[0] for p in ok], [p[1] for p in ok], ".", ms=3, color="#4c72b0", label="answered"
            )
            if bad:
                top_y: float = max((p[1] for p in ok), default=1.0)
                ax.plot(bad, [top_y] * len(bad), "x", color="#c44e52", label="failed")
            ax.axvline(d["kill_at_s"], color="black", ls="--", lw=1, label="kill -9 node")
            low = min((p[1] for p in ok), default=100.0) * 0.7
            ticks = d.get("attempt_events", [])
            if ticks:
                ax.plot(
                    [e[0] for e in ticks],
                    [low] * len(ticks),
                    "|",
                    color="#dd8452",
                    ms=16,
                    mew=2,
                    label="a replica tried the dead node",
                )
            unhealthy = d.get("unhealthy_after_s")
            if unhealthy is not None and not math.isnan(unhealthy):
                ax.axvline(
                    d["kill_at_s"] + unhealthy,
                    color="gray",
                    ls=":",
                    lw=1,
                    label="checker: unhealthy",
                )
            ax.set_yscale("log")
            # Room above the points for the legend.
            ax.set_ylim(low * 0.8, max((p[1] for p in ok), default=1000.0) * 6)
            ax.set_xlabel("arrival time, s")
            ax.set_title(f"{title}: {d['failed']} failed", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper right")
        axes[0][0].set_ylabel("latency, ms (log)")
        fig.suptitle(
            f"Failure drill: kill -9 one node mid-run ({drills[panels[0][0]]['load']:.0%} load)",
            fontsize=11,
        )
        written.append(save(fig, "drill.png"))
    return written


# -- main --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version()}


async def main_async(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    started = time.monotonic()
    scenario = Scenario(
        args.nodes,
        Lengths(args.median_tokens, args.sigma, args.max_tokens),
        args.load,
        args.stream_fraction,
    )
    h = Harness(args, log_dir)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal() -> None:
        h.interrupted = True
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    result: dict[str, Any] = {
        "bench": "routing",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python scripts/bench_routing.py", *sys.argv[1:]]).strip(),
        "machine": machine(),
        "runs": args.runs,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "seed": args.seed,
        "scenario": scenario.describe(),
    }
    try:
        h.start_redis()
        for spec in scenario.nodes:
            h.start_node(spec)
        parts = set(args.parts)
        if "compare" in parts:
            result["comparison"] = await compare(h, scenario)
        if "scale" in parts:
            result["scale"] = await scale(h)
        if "drills" in parts:
            result["drills"] = await drills(h, scenario)
        result["log_findings"] = {
            "nodes": log_findings(c for _s, c in h.nodes.values()),
        }
    except Exception:
        if h.interrupted:  # the children got the signal too: what failed next is no news
            raise Interrupted from None
        raise
    finally:
        await h.close()
    if h.interrupted:
        raise Interrupted
    result["targets"] = evaluate(result)
    result["elapsed_s"] = time.monotonic() - started
    return result


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="a small smoke set (about 2 minutes)")
    p.add_argument("--runs", type=int, help="runs per set-up; figures are medians (default 3)")
    p.add_argument("--seed", type=int, default=1, help="run r uses seed + r (default 1)")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 8)")
    p.add_argument("--warmup", type=float, help="seconds of load before measuring (default 1)")
    p.add_argument("--load", type=float, default=0.7, help="fraction of capacity (default 0.7)")
    p.add_argument("--out", type=Path, help="where to write (default docs/benchmarks)")
    p.add_argument(
        "--parts", default="compare,scale,drills", help="comma list of compare,scale,drills"
    )
    p.add_argument(
        "--only", help="comma list: compare only set-ups whose key (strategy/set-up) has one"
    )
    p.add_argument(
        "--nodes",
        type=parse_nodes,
        default=DEFAULT_NODES,
        help="name:slots:tokens_per_s:prefill_ms,... (default: "
        + ",".join(f"{n.name}:{n.slots}:{n.tokens_per_s:g}:{n.prefill_ms:g}" for n in DEFAULT_NODES)
        + ")",
    )
    p.add_argument("--median-tokens", type=float, default=32.0, help="output length median")
    p.add_argument("--sigma", type=float, default=0.5, help="output length lognormal sigma")
    p.add_argument("--max-tokens", type=int, default=128, help="output length cap")
    p.add_argument("--stream-fraction", type=float, default=0.5, help="share of SSE requests")
    p.add_argument("--scale-rate", type=float, default=100.0, help="req/s in the scale part")
    p.add_argument("--scale-duration", type=float, help="seconds per scale run (default 4)")
    p.add_argument("--drill-load", type=float, default=0.5, help="fraction of capacity")
    p.add_argument("--drill-duration", type=float, help="seconds per drill (default 12)")
    p.add_argument("--drill-lease", type=float, default=3.0, help="--lease-seconds, replica drill")
    p.add_argument("--drill-victim", default="fast-2", help="node killed in the node drill")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: redraw the charts and results.md of a results.json into --out",
    )
    p.add_argument("--serve-instant-nodes", type=int, metavar="N", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_instant_nodes is not None:
        return serve_instant_nodes(args.serve_instant_nodes)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        out_dir: Path = args.out or args.replot.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        result["targets"] = evaluate(result)
        write_markdown(result, out_dir, write_charts(result, out_dir))
        return 0
    quick = args.quick
    for name, full, small in (
        ("runs", 3, 1),
        ("duration", 8.0, 4.0),
        ("warmup", 1.0, 0.5),
        ("scale_duration", 4.0, 2.0),
        ("drill_duration", 12.0, 8.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.only = [x.strip() for x in (args.only or "").split(",") if x.strip()]
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not set(args.parts) <= {"compare", "scale", "drills"} or not args.parts:
        p.error("--parts is a comma list of compare, scale, drills")
    if args.runs < 1 or args.duration <= 0 or not 0 < args.load < 1.5:
        p.error("--runs >= 1, --duration > 0, 0 < --load < 1.5")
    if args.drill_victim not in {n.name for n in args.nodes}:
        p.error(f"--drill-victim is one of {', '.join(n.name for n in args.nodes)}")
    out: Path | None = args.out
    if out is None and not quick:
        out = ROOT / "docs" / "benchmarks"

    signal.signal(signal.SIGTERM, _interrupt)
    log_dir = Path(tempfile.mkdtemp(prefix="fleetgate-bench-routing-"))
    try:
        try:
            result = asyncio.run(main_async(args, log_dir))
        except (StartupError, RuntimeError, TimeoutError, OSError, RedisError) as exc:
            print(f"bench_routing: failed: {exc}", file=sys.stderr)
            return 1
        print_report(result)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            charts = write_charts(result, out)
            (out / "results.json").write_text(json.dumps(_clean(result), indent=1) + "\n")
            write_markdown(result, out, charts)
            _progress(f"wrote {', '.join(['results.json', 'results.md', *charts])} to {out}")
        print(f"elapsed: {result['elapsed_s']:.0f} s")
        print(json.dumps(summary_line(result)))
        return 0
    except (KeyboardInterrupt, Interrupted, asyncio.CancelledError):
        print("bench_routing: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
