"""The routing benchmark's fleet: a Redis, the simulated nodes, and gateway replicas and
health-checkers started and stopped around each measurement."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from scripts.bench.harness import (
    START_TIMEOUT_S,
    Child,
    Interrupted,
    Processes,
    RedisServer,
    StartupError,
    free_port,
)
from scripts.bench.load import MODEL
from scripts.bench.scenario import NodeSpec, Setup
from shared_state.schema import KeySchema

# Log lines that are expected and not worth reporting.
EXPECTED_LOG = (
    "using the embedded in-process store",
    "fleetgate: gateway ",
    "fleetgate: health-checker ",
)


class Fleet:
    """Redis, the simulated nodes, and starting and stopping gateways and checkers."""

    def __init__(self, log_dir: Path) -> None:
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
        """Start the fleet's redis-server and connect to it."""
        self.redis_server = RedisServer().start()
        self.redis = aioredis.Redis.from_url(self.redis_url, decode_responses=True)

    async def close(self) -> None:
        """Stop everything the fleet started."""
        if self.redis is not None:
            await self.redis.aclose()
        self.procs.close()
        if self.redis_server is not None:
            self.redis_server.close()

    def start_node(self, spec: NodeSpec, port: int | None = None) -> Child:
        """Start a simulated node (on ``port``, else a free one) and wait until it listens."""
        port = port or free_port()
        argv = [self.py, "-m", "gateway.sim.node", "--port", str(port), "--model", MODEL]
        argv += ["--slots", str(spec.slots), "--tokens-per-s", str(spec.tokens_per_s)]
        argv += ["--prefill-ms", str(spec.prefill_ms), "--name", spec.name]
        child = self.procs.start(f"node-{spec.name}", argv, port)
        self.procs.wait_port(child)
        self.nodes[spec.name] = (spec, child)
        return child

    def start_gateways(
        self, setup: Setup, *, lease_s: float = 30.0, tag: str = "", options: Sequence[str] = ()
    ) -> list[Child]:
        """Start the set-up's replicas (on Redis when it is shared), with the gateway's
        command-line ``options`` besides, and wait until they listen."""
        children = []
        for i in range(setup.replicas):
            port = free_port()
            argv = [self.py, "-m", "gateway", "--port", str(port), "--strategy", setup.strategy]
            argv += ["--replica-id", f"gw-{i}", "--lease-seconds", f"{lease_s:g}"]
            argv += ["--shutdown-timeout", "2", "--log-level", "warning", *options]
            if setup.shared:
                argv += ["--redis-url", self.redis_url]
            name = f"gw-{i}-{setup.key.replace('/', '-')}{tag}"
            children.append(self.procs.start(name, argv, port))
        for child in children:
            self.procs.wait_port(child)
        return children

    async def shared_state(self, setup: Setup) -> list[Child]:
        """For a set-up sharing Redis: Redis emptied and a health-checker started (returned,
        for the caller to stop); nothing for private stores."""
        if not setup.shared:
            return []
        await self.reset_redis()
        return [self.start_checker()]

    def start_checker(self) -> Child:
        """Start a health-checker on the fleet's Redis (every 0.5 s, fall 2, rise 2)."""
        argv = [self.py, "-m", "gateway.checker.health_checker", "--redis-url", self.redis_url]
        argv += ["--interval", "0.5", "--fall", "2", "--rise", "2", "--timeout", "0.5"]
        argv += ["--deregister-after", "0", "--generate-every", "0", "--log-level", "warning"]
        return self.procs.start("checker", argv)

    async def reset_redis(self) -> None:
        """Empty Redis and zero its statistics."""
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
        self,
        session: aiohttp.ClientSession,
        gateways: Sequence[Child],
        nodes: int,
        model: str = MODEL,
    ) -> None:
        """Wait until every gateway sees all ``nodes`` active (it follows the registry) and
        lists ``model``."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for gw in gateways:
            while True:
                async with session.get(gw.url + "/nodes/status") as resp:
                    status = await resp.json() if resp.status == 200 else {}
                active = sum(1 for v in status.values() if v.get("state") == "active")
                if active >= nodes:
                    async with session.get(gw.url + "/v1/models") as resp:
                        listing = await resp.json()
                    if any(m.get("id") == model for m in listing.get("data", [])):
                        break
                if time.monotonic() > deadline or not gw.alive():
                    raise StartupError(f"{gw.name} never saw {nodes} active nodes:\n{gw.tail()}")
                await asyncio.sleep(0.05)

    async def sim_stats(self, session: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
        """Each live node's /sim/stats, by node name."""
        out = {}
        for name, (_spec, node) in self.nodes.items():
            if node.alive():
                async with session.get(node.url + "/sim/stats") as resp:
                    out[name] = await resp.json()
        return out

    async def wait_nodes_idle(self, session: aiohttp.ClientSession, timeout_s: float = 60) -> bool:
        """Wait until no live node runs or queues a request; False after ``timeout_s``."""
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
