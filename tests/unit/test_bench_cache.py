"""Pure logic of the cache benchmark (scripts/bench_cache.py): the chats it offers are the same
for a seed, a run's hit rates and figures are computed as documented, set-ups are compared run
by run, and the targets are judged from those figures."""

from __future__ import annotations

import itertools
import math
import socket
from typing import Any

import pytest

from scripts.bench.cache_engines import engine_setups
from scripts.bench.cache_figures import (
    gateway_counters,
    paired_ratio,
    summarize_cache_run,
    within_run_ratio,
)
from scripts.bench.cache_main import merged
from scripts.bench.cache_nodes import CacheNode, parse_cache_nodes, slow_names
from scripts.bench.cache_runs import scrub
from scripts.bench.cache_targets import evaluate_cache
from scripts.bench.cache_workload import (
    CacheWorkload,
    bytes_per_token,
    gateway_blocks,
    make_cache_schedule,
    mean_prompt_tokens,
    plan,
    prompt_tokens,
    sim_answer,
)
from scripts.bench.chat_load import ChatResult, request_body
from scripts.bench.chats import ChatTurn
from scripts.bench.hits import PromptTokens

WORKLOAD = CacheWorkload(
    prompts=4, prompt_words=60, conversations=20, min_turns=2, max_turns=4, open_at_once=5
)


def test_a_schedule_is_the_same_for_a_seed_and_deals_every_planned_turn_in_order() -> None:
    schedule = make_cache_schedule(7, 5.0, WORKLOAD)
    assert schedule == make_cache_schedule(7, 5.0, WORKLOAD)
    assert schedule != make_cache_schedule(8, 5.0, WORKLOAD)
    chats = plan(7, WORKLOAD)
    assert chats == plan(7, WORKLOAD) and len(chats) == WORKLOAD.conversations
    assert {c.turns for c in chats} <= {2, 3, 4} and len({c.turns for c in chats}) > 1
    assert len(schedule) == sum(c.turns for c in chats)  # bounded in count...
    assert schedule[-1].at <= len(schedule) / 5.0  # ...and in time
    assert [t.at for t in schedule] == sorted(t.at for t in schedule)
    by_chat: dict[int, list[ChatTurn]] = {}
    for turn in schedule:
        by_chat.setdefault(turn.chat, []).append(turn)
    assert sorted(by_chat) == list(range(WORKLOAD.conversations))
    for index, turns in by_chat.items():
        assert [t.turn for t in turns] == list(range(chats[index].turns))
        assert {t.system for t in turns} == {chats[index].system}
    gaps = [
        b.at - a.at for turns in by_chat.values() for a, b in itertools.pairwise(turns)
    ]  # only the last conversations, when none is ready, may come back sooner
    assert sum(g >= WORKLOAD.min_gap_s for g in gaps) >= 0.8 * len(gaps)
    assert all(t.stream for t in schedule)  # stream_fraction 1.0


def test_a_prompt_grows_by_its_question_and_the_answer_before() -> None:
    chats = WORKLOAD.chats()
    answers = [sim_answer(WORKLOAD.answer_tokens)] * 3
    for k in range(4):
        body = request_body("m", chats, 1, ChatTurn(0.0, 2, k, 1, True, 0.0), answers[:k])
        words = sum(len(m["content"].split()) for m in body["messages"])
        assert words == prompt_tokens(WORKLOAD, k)
        assert body["stream_options"] == {"include_usage": True}


def test_a_node_cache_is_told_to_the_gateway_in_its_own_blocks() -> None:
    per_token = bytes_per_token(WORKLOAD, "m")
    assert 4.0 < per_token < 6.0  # common short words, a space, the roles and separators
    assert gateway_blocks(256, 16, 4.0, 256) == 64
    assert gateway_blocks(1, 16, 4.0, 256) == 1  # never none


def test_nodes_parse_and_the_slower_ones_are_named() -> None:
    nodes = parse_cache_nodes("a:8:60:6000:256, b:8:40:4000:128")
    assert nodes == (CacheNode("a", 8, 60, 6000, 256), CacheNode("b", 8, 40, 4000, 128))
    assert slow_names(nodes) == {"b"} and slow_names(nodes[:1]) == set()
    with pytest.raises(ValueError):
        parse_cache_nodes("a:8:60:6000:256,a:8:60:6000:256")
    # Cold, a node is bound by its prefills, one at a time, or by its slots.
    prompt = mean_prompt_tokens(WORKLOAD)
    assert prompt == pytest.approx(
        sum(prompt_tokens(WORKLOAD, k) for k in (0, 1, 0, 1, 2, 0, 1, 2, 3)) / 9
    )
    assert CacheNode("p", 8, 60, 1000, 1).cold_capacity_rps(WORKLOAD) == pytest.approx(
        1000 / prompt
    )
    assert nodes[0].cold_capacity_rps(WORKLOAD) == pytest.approx(8 / (prompt / 6000 + 32 / 60))


def result(
    at: float, node: str, prompt: int, cached: int, ttft: float, latency: float
) -> ChatResult:
    res = ChatResult(ChatTurn(at, 0, 0, 0, True, 0.0), 0)
    res.ok, res.node, res.sent = True, node, at
    res.tokens, res.ttft, res.latency = PromptTokens(prompt, cached), ttft, latency
    res.completion_tokens = 10
    return res


def test_hit_rates_are_token_weighted_over_the_measured_window() -> None:
    names = {"http://a": "a", "http://b": "b"}
    results = [
        result(0.0, "http://a", 1000, 0, 0.5, 1.0),  # warm-up: not counted
        result(1.0, "http://a", 1000, 900, 0.1, 1.0),
        result(2.0, "http://b", 100, 0, 0.3, 2.0),
    ]
    failed = ChatResult(ChatTurn(3.0, 1, 0, 0, True, 0.0), 0)
    failed.error = "HTTP 502"
    counted = {"a": PromptTokens(2000, 900), "b": PromptTokens(100, 0)}
    s = summarize_cache_run([*results, failed], 1.0, names, counted, slow={"b"})
    assert s["hit_rate"] == pytest.approx(900 / 1100)  # not the mean of 90% and 0%
    assert s["node_hit_rate"] == pytest.approx(900 / 2100)  # the whole run
    assert s["usage_prompt_tokens_whole_run"] == 2100 == s["node_prompt_tokens"]
    assert s["requests"] == 3 and s["ok"] == 2 and s["errors"] == 1
    assert s["ttft_mean_ms"] == pytest.approx(200) and s["mean_ms"] == pytest.approx(1500)
    assert s["turns_per_s"] == pytest.approx(2 / 3.0)  # sent at 1, last answered at 4
    assert s["shares"] == {"a": 0.5, "b": 0.5}
    assert s["classes"]["slow"]["p99_ms"] == pytest.approx(2000)
    assert s["classes"]["fast"]["turns"] == 1
    nothing = summarize_cache_run([], 0.0, names)
    assert math.isnan(nothing["hit_rate"]) and math.isnan(nothing["node_hit_rate"])


def test_the_gateways_counters_add_up_over_replicas() -> None:
    page = """# HELP fleetgate_prefix_blocks_total cache_aware: prompt blocks routed
fleetgate_prefix_blocks_total{kind="total"} 200
fleetgate_prefix_blocks_total{kind="matched"} 150
fleetgate_store_errors_total{op="pick"} 2
fleetgate_store_errors_total{op="release"} 1
fleetgate_requests_total{node="a",model="m",code="200"} 9
"""
    found = gateway_counters([page, page.replace("150", "50")])
    assert found["prefix_total"] == 400 and found["prefix_matched"] == 200
    assert found["store_errors"] == 6 and found["retries"] == 0
    s = summarize_cache_run([], 0.0, {}, gateway=found)
    assert s["index_hit_rate"] == 0.5 and s["store_errors"] == 6
    assert math.isnan(summarize_cache_run([], 0.0, {})["index_hit_rate"])


def runs(values: list[float], seeds: list[int], key: str = "ttft_mean_ms") -> list[dict[str, Any]]:
    return [{"seed": s, key: v} for v, s in zip(values, seeds, strict=True)]


def test_set_ups_are_compared_on_runs_of_the_same_seed() -> None:
    top = runs([200.0, 90.0, 400.0], [1, 2, 3])
    base = runs([200.0, 100.0, 50.0], [3, 2, 1])  # another order: paired by seed
    assert paired_ratio(top, base, "ttft_mean_ms") == pytest.approx(2.0)  # of 4, 0.9, 2
    assert math.isnan(paired_ratio(top, runs([1.0], [9]), "ttft_mean_ms"))
    classes = [{"classes": {"slow": {"p99_ms": s}, "fast": {"p99_ms": 100.0}}} for s in (150, 300)]
    assert within_run_ratio(classes, "classes.slow.p99_ms", "classes.fast.p99_ms") == 2.25


def row(strategy: str, mode: str, ttft: list[float], hits: list[float]) -> dict[str, Any]:
    triples = zip([1, 2, 3], ttft, hits, strict=True)
    out = [{"seed": s, "ttft_mean_ms": t, "hit_rate": h} for s, t, h in triples]
    return {"strategy": strategy, "mode": mode, "runs": out}


def test_targets_pass_and_fail_on_the_paired_figures() -> None:
    chats = {
        "cache_aware/1-replica": row("cache_aware", "1 replica", [50, 60, 55], [0.9, 0.9, 0.9]),
        "cache_aware/4-shared": row("cache_aware", "4 shared", [52, 58, 70], [0.88, 0.9, 0.8]),
        "cache_aware/4-private": row("cache_aware", "4 private", [90, 100, 160], [0.6] * 3),
        "min_expected_latency/4-shared": row(
            "min_expected_latency", "4 shared", [200, 200, 200], [0.5] * 3
        ),
    }
    unequal_runs = [
        {
            "seed": 1,
            "classes": {
                "slow": {"p99_ms": 900, "ttft_p99_ms": 300},
                "fast": {"p99_ms": 600, "ttft_p99_ms": 100},
            },
        },
    ]
    engines = {
        "cache_aware/1-replica": row(
            "cache_aware", "1 replica", [100, 110, 100], [0.85, 0.9, 0.85]
        ),
        "cache_aware/4-shared": row("cache_aware", "4 shared", [100, 120, 110], [0.85] * 3),
        "min_expected_latency/4-shared": row(
            "min_expected_latency", "4 shared", [300, 200, 210], [0.6] * 3
        ),
        "round_robin/4-shared": row("round_robin", "4 shared", [300, 300, 200], [0.6] * 3),
        "cache_aware/4-private": row("cache_aware", "4 private", [250, 250, 240], [0.6] * 3),
    }
    result = {
        "scenarios": {
            "chats": {"comparison": chats},
            "unequal": {"comparison": {"cache_aware/4-shared": {"runs": unequal_runs}}},
            "engines": {"comparison": engines},
        }
    }
    targets = evaluate_cache(result)
    verdicts = {name.split(": ", 1)[1]: t["holds"] for name, t in targets.items()}
    assert verdicts == {
        "cache_aware, 4 sharing vs 1 replica: hit rate": True,  # median of 0.98, 1, 0.89
        "cache_aware, 4 sharing vs 1 replica: mean TTFT": True,  # median of 1.04, 0.97, 1.27
        "mean TTFT, cache_aware, 4 private stores vs cache_aware 4 sharing": False,  # 1.73
        "mean TTFT, min_expected_latency, 4 sharing vs cache_aware 4 sharing": True,
        "cache_aware, slow vs fast nodes: p99 latency": True,  # 1.5x
        "cache_aware, slow vs fast nodes: p99 TTFT": False,  # 3x
        "mean TTFT, min_expected_latency vs cache_aware (4-shared)": False,  # 3, 1.67, 1.91
        "mean TTFT, round_robin vs cache_aware (4-shared)": True,  # 3, 2.5, 1.82
        "mean TTFT, cache_aware, 4-private vs 4-shared": True,  # 2.5, 2.08, 2.18
        "cache_aware, 4-shared vs 1 replica: hit rate": True,  # median of 1, 0.94, 1
        "cache_aware, 4-shared vs 1 replica: mean TTFT": False,  # median of 1, 1.09, 1.1
    }
    assert targets["real engines: mean TTFT, cache_aware, 4-private vs 4-shared"][
        "figure"
    ] == pytest.approx(240 / 110)
    assert targets["chats: mean TTFT, cache_aware, 4 private stores vs cache_aware 4 sharing"][
        "figure"
    ] == pytest.approx(90 / 52)  # of 90/52, 100/58, 160/70
    assert evaluate_cache({"scenarios": {}}) == {}  # nothing ran, nothing judged


def test_an_update_keeps_the_parts_it_did_not_measure_of_the_same_workload() -> None:
    chats = {"comparison": {}, "elapsed_s": 100.0, "turns": None}
    saved = {"workload": {"prompts": 8}, "warmup_turns": 32, "seed": 1}
    result = {**saved, "scenarios": {"engines": {"comparison": {}}}, "elapsed_s": 10.0}
    both = merged(result, {**saved, "scenarios": {"chats": chats, "engines": {"old": 1}}})
    assert list(both["scenarios"]) == ["chats", "engines"]
    assert both["scenarios"]["engines"] == {"comparison": {}}  # the new one replaces the old
    assert math.isnan(both["scenarios"]["chats"]["turns"])  # saved nulls are NaN again
    assert both["elapsed_s"] == 110.0 and both["targets"] == {}
    with pytest.raises(ValueError, match="workload"):
        merged(result, {**saved, "workload": {"prompts": 4}, "scenarios": {}})


def test_log_lines_kept_in_the_results_name_no_host_and_no_path() -> None:
    host = socket.gethostname()
    lines = [
        f"checker: WARNING checker {host}-30bc2d63 stops leading: a write was fenced",
        'gw-0: Traceback: File "/srv/fleetgate/gateway/replica/routing.py", line 3',
        "gw-1: POST http://127.0.0.1:8080/v1/chat/completions 1/2 done",
    ]
    assert scrub(lines) == [
        "checker: WARNING checker <host>-<id> stops leading: a write was fenced",
        'gw-0: Traceback: File "<path>", line 3',
        lines[2],
    ]


def test_the_engines_compare_sharing_replicas_with_one_and_with_private_stores() -> None:
    keys = [s.key for s in engine_setups(4)]
    assert keys == [
        "cache_aware/1-replica",
        "cache_aware/4-shared",
        "min_expected_latency/4-shared",
        "round_robin/4-shared",
        "cache_aware/4-private",
    ]
    assert len({s.key for s in engine_setups(2)}) == 5
