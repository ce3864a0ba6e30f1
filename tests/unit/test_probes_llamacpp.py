"""The health-checker's reading of llama.cpp's load, on pages captured from a real
``llama-server`` (the pinned version of scripts/engine/llama.py, two slots, ``--metrics``):
its metrics give running and deferred requests but no KV-cache gauge, its ``/slots`` give the
KV figure. The captures are in tests/unit/data; the simulated llama.cpp flavor serves the same
names (gateway/sim/flavors.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.checker.probes import parse_gauges, parse_load, slots_usage

DATA = Path(__file__).parent / "data"


def text(name: str) -> str:
    return (DATA / name).read_text()


def test_llamacpp_metrics_give_running_and_deferred_but_no_kv_figure() -> None:
    busy = parse_gauges(text("llamacpp-metrics-busy.txt"))
    assert (busy.kv_usage, busy.running, busy.waiting, busy.llamacpp) == (None, 2, 1, True)
    idle = parse_gauges(text("llamacpp-metrics-idle.txt"))
    assert (idle.kv_usage, idle.running, idle.waiting, idle.llamacpp) == (None, 0, 0, True)
    # Alone, a llama.cpp page is no load: min_cache_usage needs the KV figure of /slots.
    assert parse_load(text("llamacpp-metrics-busy.txt")) is None


def test_llamacpp_slots_give_the_kv_figure_of_busy_slots_only() -> None:
    busy = json.loads(text("llamacpp-slots-busy.json"))
    held = sum(slot["n_prompt_tokens"] for slot in busy if slot["is_processing"])
    assert slots_usage(busy) == pytest.approx(held / sum(slot["n_ctx"] for slot in busy))
    load = parse_gauges(text("llamacpp-metrics-busy.txt")).load(slots_usage(busy))
    assert load is not None and (load.running, load.waiting) == (2, 1)
    assert 0 < load.kv_usage < 1
    # Idle slots keep their last prompt cached for reuse, but hold nothing that counts.
    idle = json.loads(text("llamacpp-slots-idle.json"))
    assert all(slot["n_prompt_tokens"] > 0 for slot in idle)
    assert slots_usage(idle) == 0.0


def test_slots_usage_refuses_what_is_not_a_slot_list() -> None:
    refused: list[object] = [[], {}, None, [1], [{"n_ctx": 0}], [{"n_ctx": True}], [{"id": 0}]]
    for listing in refused:
        assert slots_usage(listing) is None, listing


def test_older_llamacpp_kv_gauge_is_read_directly() -> None:
    page = (
        "llamacpp:kv_cache_usage_ratio 0.25\n"
        "llamacpp:requests_processing 1\n"
        "llamacpp:requests_deferred 3\n"
    )
    load = parse_load(page)
    assert load is not None and (load.kv_usage, load.running, load.waiting) == (0.25, 1, 3)
