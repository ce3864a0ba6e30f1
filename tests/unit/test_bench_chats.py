"""Pure logic of the routing benchmark's chat scenario on real engines (scripts/bench): the chat
schedule and its messages, hit rates from usage and from the engines' counters, a run's figures,
the set-ups and their ratios to the baseline, and the cache capacity the gateways are told."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest

from scripts.bench.calibration import Calibration, EngineCalibration
from scripts.bench.chat_load import ChatResult, summarize_chats
from scripts.bench.chats import ChatTurn, ChatWorkload, make_chat_schedule, messages
from scripts.bench.engine_runs import (
    BASELINE,
    engine_setups,
    ratios_vs_baseline,
    recorded_command,
    rotated,
)
from scripts.bench.harness import Processes
from scripts.bench.hits import (
    CounterReset,
    PromptTokens,
    delta,
    engine_tokens,
    parse_metrics,
    total,
    usage_tokens,
)
from scripts.bench.llama_nodes import (
    LlamaBuild,
    LlamaFleet,
    LlamaSpec,
    kv_bytes_per_token,
    parse_llamas,
)

WORKLOAD = ChatWorkload(prompts=4, prompt_words=50, turns=3, conversations=5, min_gap_s=2.0)


def test_a_schedule_is_the_same_for_a_seed_and_deals_turns_in_order() -> None:
    schedule = make_chat_schedule(7, 3.0, 40.0, WORKLOAD)
    assert schedule == make_chat_schedule(7, 3.0, 40.0, WORKLOAD)
    assert schedule != make_chat_schedule(8, 3.0, 40.0, WORKLOAD)
    assert len(schedule) == 120  # conditioned on its expected count
    assert [t.at for t in schedule] == sorted(t.at for t in schedule)
    by_chat: dict[int, list[ChatTurn]] = {}
    for turn in schedule:
        by_chat.setdefault(turn.chat, []).append(turn)
    assert len(by_chat) >= 120 // WORKLOAD.turns
    for turns in by_chat.values():
        assert [t.turn for t in turns] == list(range(len(turns)))  # no turn skipped
        assert len(turns) <= WORKLOAD.turns
        assert len({t.system for t in turns}) == 1  # a conversation keeps its system prompt
        gaps = [b.at - a.at for a, b in itertools.pairwise(turns)]
        assert all(g >= WORKLOAD.min_gap_s for g in gaps)
    assert {t.system for t in schedule} == set(range(WORKLOAD.prompts))
    streamed = sum(t.stream for t in schedule) / len(schedule)
    assert 0.3 < streamed < 0.7


def test_a_turn_resends_its_conversation_with_the_answers_it_got() -> None:
    first = ChatTurn(0.0, 3, 0, 1, False, 0.5)
    second = ChatTurn(5.0, 3, 1, 1, True, 0.5)
    m1 = messages(WORKLOAD, 1, first, [])
    m2 = messages(WORKLOAD, 1, second, ["an answer"])
    assert [m["role"] for m in m1] == ["system", "user"]
    assert [m["role"] for m in m2] == ["system", "user", "assistant", "user"]
    assert m2[:2] == m1 and m2[2]["content"] == "an answer"  # the next turn extends the prefix
    assert m2[3] != m1[1]
    other = messages(WORKLOAD, 1, ChatTurn(0.0, 4, 0, 1, False, 0.5), [])
    assert other[0] == m1[0] and other[1] != m1[1]  # the system prompt is what chats share
    assert len(m1[0]["content"].split()) == 5 + WORKLOAD.prompt_words
    with pytest.raises(ValueError):
        messages(WORKLOAD, 1, second, [])


def test_hit_rates_are_weighted_by_tokens_and_nan_without_any() -> None:
    assert usage_tokens(
        {"prompt_tokens": 1000, "prompt_tokens_details": {"cached_tokens": 900}}
    ) == PromptTokens(1000, 900)
    assert usage_tokens({"prompt_tokens": 50}) == PromptTokens(50, 0)
    assert usage_tokens({"prompt_tokens": 50, "prompt_tokens_details": None}).cached == 0
    assert usage_tokens(None) == PromptTokens()
    both = total([PromptTokens(1000, 900), PromptTokens(100, 0)])
    assert both == PromptTokens(1100, 900)
    assert both.hit_rate == pytest.approx(900 / 1100)  # not the mean of 90% and 0%
    assert math.isnan(PromptTokens().hit_rate)


LLAMA_METRICS = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 2212
llamacpp:prompt_tokens_cached_total 4204
llamacpp:requests_processing 0
"""
VLLM_METRICS = """vllm:prefix_cache_queries_total{engine="0",model_name="a"} 300.0
vllm:prefix_cache_queries_total{engine="0",model_name="b"} 100.0
vllm:prefix_cache_hits_total{engine="0",model_name="a"} 128.0
garbage line
"""


def test_engine_counters_give_the_prompt_and_cached_tokens() -> None:
    llama = parse_metrics(LLAMA_METRICS)
    # llama.cpp counts only what it prefilled: the prompt is that plus the cached tokens.
    assert engine_tokens(llama) == PromptTokens(2212 + 4204, 4204)
    vllm = parse_metrics(VLLM_METRICS)
    assert vllm["vllm:prefix_cache_queries_total"] == 400.0  # label sets added up
    assert engine_tokens(vllm) == PromptTokens(400, 128)
    assert engine_tokens({"llamacpp:requests_processing": 0.0}) is None
    assert delta(PromptTokens(100, 50), PromptTokens(160, 90)) == PromptTokens(60, 40)
    with pytest.raises(CounterReset):
        delta(PromptTokens(100, 50), PromptTokens(10, 5))  # the engine restarted


def result(
    at: float, turn: int, prompt: int, cached: int, node: str, stream: bool = True
) -> ChatResult:
    res = ChatResult(ChatTurn(at, 0, turn, 0, stream, 0.0), 0)
    res.ok = True
    res.latency, res.ttft, res.node = 1.0 + at / 100, 0.5, node
    res.tokens = PromptTokens(prompt, cached)
    return res


def test_a_run_is_summarized_over_its_measured_window() -> None:
    failed = ChatResult(ChatTurn(5.0, 1, 0, 0, False, 0.0), 0, error="HTTP 502")
    results = [
        result(0.0, 0, 1000, 0, "http://a"),  # warm-up: not counted
        result(2.0, 0, 1000, 900, "http://a"),
        result(3.0, 1, 1200, 0, "http://b", stream=False),
        result(4.0, 2, 1300, 1250, "http://b"),
        failed,
    ]
    names = {"http://a": "a", "http://b": "b"}
    s = summarize_chats(results, 1.0, math.inf, names)
    assert (s["requests"], s["ok"], s["errors"]) == (4, 3, 1)
    assert s["error_kinds"] == {"HTTP 502": 1}
    assert s["hit_rate"] == pytest.approx((900 + 1250) / (1000 + 1200 + 1300))
    assert s["hit_rate_first"] == pytest.approx(0.9)
    assert s["hit_rate_later"] == pytest.approx(1250 / 2500)
    assert s["miss_share"] == pytest.approx(1 / 3)  # the turn that found nothing cached
    assert s["shares"] == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    assert s["ttft_p50_ms"] == pytest.approx(500)  # of the two streams
    assert s["mean_ms"] == pytest.approx(1030)


def row(strategy: str, mode: str, means: list[float], seeds: list[int]) -> dict[str, Any]:
    runs = [
        {"seed": s, "mean_ms": m, "p90_ms": 2 * m, "ttft_p50_ms": m / 2}
        for s, m in zip(seeds, means, strict=True)
    ]
    return {"strategy": strategy, "mode": mode, "runs": runs}


def test_ratios_to_the_baseline_pair_runs_by_seed() -> None:
    comparison = {
        "round_robin/4-shared": row(BASELINE, "4 shared", [1000, 500, 900], [1, 2, 3]),
        # Listed in another order: runs are paired by seed, not by position.
        "cache_aware/4-shared": row("cache_aware", "4 shared", [300, 450, 400], [3, 1, 2]),
    }
    ratios_vs_baseline(comparison, "round_robin/4-shared")
    vs = comparison["cache_aware/4-shared"]["vs_baseline"]
    assert sorted(vs["mean_ms_runs"]) == pytest.approx(sorted([0.45, 0.8, 300 / 900]))
    assert vs["mean_ms"] == pytest.approx(0.45)
    assert comparison["round_robin/4-shared"]["vs_baseline"]["mean_ms"] == 1.0


def test_setups_cover_every_strategy_and_cache_aware_on_one_replica() -> None:
    keys = [s.key for s in engine_setups(4, quick=False)]
    assert keys[0] == "round_robin/4-shared"
    for strategy in ("least_connections", "min_expected_latency", "min_observed_latency"):
        assert f"{strategy}/4-shared" in keys
    for strategy in ("session_affinity", "min_cache_usage", "cache_aware"):
        assert f"{strategy}/4-shared" in keys
    assert "cache_aware/1-replica" in keys
    only = [s.key for s in engine_setups(4, quick=False, only=["session"])]
    assert only == ["round_robin/4-shared", "session_affinity/4-shared"]  # the baseline stays
    setups = engine_setups(2, quick=True)
    assert [s.key for s in rotated(setups, 1)] == [s.key for s in setups[1:] + setups[:1]]


def test_the_recorded_command_leaves_out_where_the_files_went() -> None:
    argv = ["--engines", "llama", "--out", "/somewhere/here", "--runs", "3", "--out=/x"]
    assert recorded_command(argv) == "python scripts/bench_routing.py --engines llama --runs 3"


def test_the_cache_capacity_told_to_the_gateways_follows_the_engines_memory() -> None:
    assert kv_bytes_per_token("llama-big") == 16 * 1024  # 8 layers x 512 keys and values, f16
    spec = LlamaSpec("e", 1, 2, 96)
    cal = Calibration({"e": EngineCalibration("e", [0.8], [0.2], 900)}, bytes_per_token=4.0)
    tokens = 96 * 64 + 2 * 900  # the prompt cache's tokens, and one prompt per slot
    assert cal.cache_blocks(spec, "llama-big", 256) == round(tokens * 4.0 / 256)
    assert cal.cold_capacity_rps == pytest.approx(1 / 0.8)


def test_alike_engines_are_registered_alike_whatever_their_calibration_says() -> None:
    specs = [LlamaSpec("a", 1, 1, 96), LlamaSpec("b", 1, 1, 96), LlamaSpec("c", 2, 1, 96)]
    # a measured 3% faster than b, and c (two threads) 1.8x a's speed.
    timings = {"a": 0.97, "b": 1.0, "c": 0.55}
    cal = Calibration({n: EngineCalibration(n, [t], [0.2], 1000) for n, t in timings.items()}, 4.0)
    a, b, c = (cal.speed(spec, specs) for spec in specs)
    assert a == b == pytest.approx(1000 / 1.0 / 1, abs=0.1)  # the median per thread
    assert c == pytest.approx(2 * a)
    assert parse_llamas("a:1:1:96, b:2:4:0") == (
        LlamaSpec("a", 1, 1, 96),
        LlamaSpec("b", 2, 4, 0),
    )
    with pytest.raises(ValueError):
        parse_llamas("a:1:1:96,a:1:1:96")


def test_an_engine_that_saves_every_prompt_turns_slot_similarity_off(tmp_path: Path) -> None:
    assert parse_llamas("a:1:1:48:save,b:1:1:48") == (
        LlamaSpec("a", 1, 1, 48, save_prompts=True),
        LlamaSpec("b", 1, 1, 48),
    )
    for bad in ("a:1:1:48:keep", "a:1:1:48:save:save"):
        with pytest.raises(ValueError):
            parse_llamas(bad)
    fleet = LlamaFleet(Processes(tmp_path), LlamaBuild(Path("llama-server"), Path("m.gguf"), "m"))
    saving = fleet.command(LlamaSpec("a", 1, 1, 48, save_prompts=True), 8080)
    default = fleet.command(LlamaSpec("b", 1, 1, 48), 8081)
    assert saving[saving.index("--slot-prompt-similarity") + 1] == "0"
    assert "--slot-prompt-similarity" not in default
    assert saving[saving.index("--cache-ram") + 1] == default[default.index("--cache-ram") + 1]
