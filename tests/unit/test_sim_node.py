"""The simulated LLM node's settings, checked before it serves, and its record of how long a
freed slot stood idle (serving for real: tests/e2e/test_sim_node.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import cast

import pytest
from aiohttp import web

from gateway.sim import node as node_module
from gateway.sim.node import SimConfig, SimNode, main


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SimConfig(slots=0)
    with pytest.raises(ValueError):
        SimConfig(fault="bogus")
    with pytest.raises(SystemExit):
        main(["--slots", "0"])


def test_prefix_cache_settings() -> None:
    for bad in ({"cache_blocks": -1}, {"block_tokens": 0}, {"prefill_tokens_per_s": -1.0}):
        with pytest.raises(ValueError):
            SimConfig(**bad)
    with pytest.raises(SystemExit):
        main(["--block-tokens", "0"])
    assert not SimConfig().kv_engine  # off by default: answers and timings as without it
    assert SimConfig(cache_blocks=8).kv_engine
    assert SimConfig(prefill_tokens_per_s=100.0).kv_engine
    assert not SimConfig(prefill_tokens_per_s=float("inf")).kv_engine
    assert not SimConfig(cache_blocks=8, role="Decode").kv_engine  # DistServe keeps its own


class Clock:
    """The node's wall clock, moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


async def test_idle_gaps_are_how_long_the_slot_freed_last_stood_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = SimNode(SimConfig(slots=2))
    clock = Clock(1000.0)
    monkeypatch.setattr(node_module, "time", clock)  # the node module's clock only
    request = cast(
        web.Request, SimpleNamespace(transport=SimpleNamespace(is_closing=lambda: False))
    )

    async def take() -> None:  # as a request's handler takes and gives back its slot
        await node._acquire(request, "sim-model")
        node._n_running += 1

    def end() -> None:
        node._n_running -= 1
        node._release()

    await take()
    await take()  # slots never used before: no gap
    clock.now = 1000.5
    end()
    clock.now = 1000.52
    await take()  # 20 ms after the end, 1 running before it
    clock.now = 1001.0
    end()
    clock.now = 1001.2
    end()
    clock.now = 1001.25
    await take()  # the slot freed last: 50 ms, not the 250 ms of the other...
    assert node.stats()["idle_gaps"] == [[1000.52, 20.0, 1], [1001.25, 50.0, 0]]
    await take()  # ...which the next request takes
    assert node.stats()["idle_gaps"][-1] == [1001.25, 250.0, 1]
    waiting = asyncio.ensure_future(take())  # both slots busy: it waits on the node
    await asyncio.sleep(0)
    assert node.stats()["waiting"] == 1
    clock.now = 1002.0
    end()  # handed straight to the waiting request
    await waiting
    assert node.stats()["idle_gaps"][-1] == [1002.0, 0.0, 1]
    assert node.stats()["peak"] == 3
    clock.now = 1003.0
    end()
    node.reset()
    assert (node.stats()["idle_gaps"], node.stats()["peak"]) == ([], 0)
    clock.now = 1004.0
    await take()  # its slot was freed before the reset, which forgot when
    assert node.stats()["idle_gaps"] == []
