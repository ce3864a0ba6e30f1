"""The simulated LLM node's settings, checked before it serves (serving for real:
tests/e2e/test_sim_node.py)."""

from __future__ import annotations

import pytest

from gateway.sim.node import SimConfig, main


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
