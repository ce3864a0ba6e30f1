"""What fleetgate reads of a real vLLM server, over answers saved from one (vLLM 0.32.0 on the
CPU, ``scripts/engine/vllm.py``, tests/e2e/engines/test_vllm.py):

- ``data/vllm_metrics.txt``: its ``/metrics`` while saturated: six long requests on a KV cache
  of 16,384 tokens, four running and two preempted back to waiting. Besides the gauges the
  checker reads it publishes ``vllm:num_requests_waiting_by_reason`` (the same waiting
  requests by reason), which must not be counted twice.
- ``data/vllm_models.json``: its ``/v1/models``, with vLLM's extra fields (``root``,
  ``max_model_len``, ``permission``); ``root`` held the model's folder on the machine it was
  saved on and was rewritten.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.checker.probes import parse_load
from shared_state.registry import model_ids

DATA = Path(__file__).parent / "data"


def test_the_checker_reads_vllms_load_from_its_metrics() -> None:
    load = parse_load((DATA / "vllm_metrics.txt").read_text())
    assert load is not None
    assert load.kv_usage == pytest.approx(0.9763779527559056)
    assert (load.running, load.waiting) == (4, 2)  # waiting_by_reason is not added again


def test_an_idle_vllm_reads_as_empty_not_unknown() -> None:
    """Idle, every gauge is 0.0: a load of zero, not a page without load figures."""
    text = (DATA / "vllm_metrics.txt").read_text()
    idle = "\n".join(
        line.rsplit(" ", 1)[0] + " 0.0"
        if line.startswith(("vllm:kv_cache_usage_perc{", "vllm:num_requests_"))
        else line
        for line in text.splitlines()
    )
    load = parse_load(idle)
    assert load is not None and (load.kv_usage, load.running, load.waiting) == (0.0, 0, 0)


def test_the_gateway_reads_the_model_of_vllms_model_list() -> None:
    listing = json.loads((DATA / "vllm_models.json").read_text())
    assert model_ids(listing) == ["vllm-tiny"]
