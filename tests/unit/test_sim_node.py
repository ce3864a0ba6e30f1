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
