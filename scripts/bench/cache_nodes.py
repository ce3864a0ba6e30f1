"""Simulated nodes with a prefix cache for the cache benchmark (scripts/bench_cache.py): what
each is given (batch slots, decode and prefill speed, cache blocks), started on loopback ports,
registered with the gateways in the gateway's own cache units, emptied between runs and read
through their own ``/metrics`` counters.

Invariants:

- A node's prefix cache is ``cache_blocks`` blocks of ``block_tokens`` words; the gateways are
  told it as the same amount of prompt text in their blocks of 256 bytes of canonical prompt
  (:func:`scripts.bench.cache_workload.gateway_blocks`), so both sides expect the same
  capacity.
- A node's registered ``speed`` is its decode capacity, slots x tokens/s; a slow node is
  slower by the same factor in prefill and decode, so that one figure ranks both.
- Counters only grow while a node lives: a run's tokens are the difference of two readings.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from scripts.bench.cache_workload import CacheWorkload, gateway_blocks, mean_prompt_tokens
from scripts.bench.harness import Child, Processes, StartupError, free_port
from scripts.bench.hits import PromptTokens, delta, engine_tokens, parse_metrics
from scripts.bench.load import MODEL

BLOCK_BYTES = 256  # the gateway's --prefix-block-bytes default


@dataclass(frozen=True, slots=True)
class CacheNode:
    """One simulated node: batch ``slots``, decode ``tokens_per_s`` per sequence, prefill
    ``prefill_tokens_per_s`` (one prefill at a time), ``cache_blocks`` of ``block_tokens``."""

    name: str
    slots: int
    tokens_per_s: float
    prefill_tokens_per_s: float
    cache_blocks: int
    block_tokens: int = 16

    @property
    def speed(self) -> float:
        """What the node is registered with: its decode capacity in tokens/s."""
        return self.slots * self.tokens_per_s

    def cold_capacity_rps(self, workload: CacheWorkload) -> float:
        """Turns/s it answers when no prompt is ever found cached: bounded by its prefills, one
        at a time, and by its slots, each busy for a prefill and an answer."""
        prompt = mean_prompt_tokens(workload)
        prefill_s = prompt / self.prefill_tokens_per_s
        turn_s = prefill_s + workload.answer_tokens / self.tokens_per_s
        return min(1 / prefill_s, self.slots / turn_s)

    def argv(self, port: int) -> list[str]:
        """The node's command line on ``port``."""
        return [
            sys.executable,
            "-m",
            "gateway.sim.node",
            "--port",
            str(port),
            "--model",
            MODEL,
            "--name",
            self.name,
            "--slots",
            str(self.slots),
            "--tokens-per-s",
            f"{self.tokens_per_s:g}",
            "--prefill-tokens-per-s",
            f"{self.prefill_tokens_per_s:g}",
            "--cache-blocks",
            str(self.cache_blocks),
            "--block-tokens",
            str(self.block_tokens),
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "slots": self.slots,
            "tokens_per_s": self.tokens_per_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "cache_blocks": self.cache_blocks,
            "block_tokens": self.block_tokens,
            "speed": self.speed,
        }


# Four alike nodes, each caching 4,096 words: about four of the eight system prompts, so a node
# that sees every prompt thrashes while the fleet, partitioned, holds them all with the open
# chats' histories. A cold turn of ~1,200 words takes 0.3 s of prefill; its 32-token answer
# 0.64 s of decode.
EQUAL_NODES = tuple(CacheNode(f"node-{i}", 8, 50.0, 4000.0, 256) for i in range(1, 5))
# Two fast nodes and two 1.5x slower in prefill and decode alike (so their p99 without any
# queueing is 1.5x the fast nodes').
UNEQUAL_NODES = (
    CacheNode("fast-1", 8, 60.0, 6000.0, 256),
    CacheNode("fast-2", 8, 60.0, 6000.0, 256),
    CacheNode("slow-1", 8, 40.0, 4000.0, 256),
    CacheNode("slow-2", 8, 40.0, 4000.0, 256),
)


def parse_cache_nodes(text: str) -> tuple[CacheNode, ...]:
    """``name:slots:tokens_per_s:prefill_tokens_per_s:cache_blocks`` items, comma-separated."""
    nodes = []
    for item in text.split(","):
        name, slots, tps, prefill, blocks = item.strip().split(":")
        nodes.append(CacheNode(name, int(slots), float(tps), float(prefill), int(blocks)))
    if not nodes or len({n.name for n in nodes}) != len(nodes):
        raise ValueError("node names must be distinct")
    if any(n.slots < 1 or n.tokens_per_s <= 0 or n.prefill_tokens_per_s <= 0 for n in nodes):
        raise ValueError("slots >= 1, tokens_per_s and prefill_tokens_per_s > 0")
    if any(n.cache_blocks < 1 for n in nodes):
        raise ValueError("cache_blocks >= 1")
    return tuple(nodes)


def slow_names(nodes: Sequence[CacheNode]) -> set[str]:
    """The nodes slower than the fastest (none when all are alike)."""
    fastest = max(n.speed for n in nodes)
    return {n.name for n in nodes if n.speed < fastest}


class CacheNodes:
    """The scenario's simulated nodes: started, registered, emptied and read."""

    def __init__(self, procs: Processes, specs: Sequence[CacheNode], per_token: float) -> None:
        self.procs = procs
        self.specs = {spec.name: spec for spec in specs}
        self.per_token = per_token  # bytes of canonical prompt per word
        self.children: dict[str, Child] = {}

    def start(self) -> None:
        """Start every node and wait until each listens."""
        for spec in self.specs.values():
            port = free_port()
            self.children[spec.name] = self.procs.start(f"node-{spec.name}", spec.argv(port), port)
        for child in self.children.values():
            self.procs.wait_port(child)

    def dead(self) -> list[str]:
        """``name (exit status)`` of every node that is no longer running."""
        return [
            f"{name} ({child.proc.returncode})"
            for name, child in self.children.items()
            if not child.alive()
        ]

    def restart_dead(self) -> None:
        """Start every node that died again, on its port, and wait until it listens."""
        for name, child in list(self.children.items()):
            if not child.alive():
                argv = self.specs[name].argv(child.port)
                self.children[name] = self.procs.start(f"node-{name}", argv, child.port)
                self.procs.wait_port(self.children[name])

    def stop(self) -> None:
        self.procs.stop(self.children.values())

    def gateway_blocks(self, name: str) -> int:
        """Node ``name``'s cache in the gateway's blocks."""
        spec = self.specs[name]
        return gateway_blocks(spec.cache_blocks, spec.block_tokens, self.per_token, BLOCK_BYTES)

    def names(self) -> dict[str, str]:
        """Node URL -> name, as the gateways name nodes in ``x-fleetgate-node``."""
        return {child.url: name for name, child in self.children.items()}

    async def register(self, session: aiohttp.ClientSession, gateways: Sequence[Child]) -> None:
        """Register every node on each of ``gateways`` through ``/nodes/add``, with its speed
        and its cache in the gateway's blocks."""
        for gw in gateways:
            for name, child in self.children.items():
                payload = {
                    "url": child.url,
                    "status": {"models": [MODEL], "speed": self.specs[name].speed},
                    "cache_blocks": self.gateway_blocks(name),
                }
                async with session.post(gw.url + "/nodes/add", json=payload) as resp:
                    if resp.status != 200:
                        text = await resp.text()
                        raise StartupError(f"{gw.name}: /nodes/add answered {resp.status}: {text}")

    async def reset_caches(self, session: aiohttp.ClientSession) -> None:
        """Empty every node's prefix cache (vLLM's ``POST /reset_prefix_cache``)."""
        for child in self.children.values():
            async with session.post(child.url + "/reset_prefix_cache") as resp:
                if resp.status != 200:
                    raise StartupError(f"{child.name}: /reset_prefix_cache {resp.status}")

    async def counters(self, session: aiohttp.ClientSession) -> dict[str, PromptTokens]:
        """Prompt tokens each node looked up and found cached since it started."""
        out = {}
        for name, child in self.children.items():
            async with session.get(child.url + "/metrics") as resp:
                counted = engine_tokens(parse_metrics(await resp.text()))
            if counted is None:
                raise StartupError(f"node {name} exports no prefix-cache counters")
            out[name] = counted
        return out

    @staticmethod
    def between(
        before: dict[str, PromptTokens], after: dict[str, PromptTokens]
    ) -> dict[str, PromptTokens]:
        """Each node's tokens between two readings."""
        return {name: delta(before[name], after[name]) for name in after}

    async def wait_idle(self, session: aiohttp.ClientSession, timeout_s: float = 60.0) -> bool:
        """Wait until no node runs or queues a request; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = 0
            for child in self.children.values():
                async with session.get(child.url + "/sim/stats") as resp:
                    stats = await resp.json()
                busy += stats["running"] + stats["waiting"]
            if busy == 0:
                return True
            await asyncio.sleep(0.1)
        return False
