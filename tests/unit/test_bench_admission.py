"""Pure logic of the admission benchmark (scripts/bench_admission.py): its scenario's capacity
and slots, the high-priority arrivals for a seed, what counts as answered, refused or lost, a
run's figures and windows, the idle gaps counted, the medians, the targets and the JSON line."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from scripts.bench.admission_figures import (
    gap_figures,
    gateway_counts,
    median_runs,
    ratio,
    series,
    summarize_run,
    throughput,
)
from scripts.bench.admission_load import Outcome, queue_depth
from scripts.bench.admission_main import parser, settle
from scripts.bench.admission_report import admission_summary_line, latency_rows, request_rows
from scripts.bench.admission_targets import FAIR, GAP, LOST, PEAK, TTFT, evaluate_admission
from scripts.bench.admission_workload import AdmissionScenario, high_schedule, idle_setup, setups

SCENARIO = AdmissionScenario(duration_s=20.0, warmup_s=5.0)


def test_the_scenario_counts_slots_capacity_and_the_slots_normal_priority_may_fill() -> None:
    assert SCENARIO.slots == 16
    assert SCENARIO.service_s == pytest.approx(0.48)  # 24 tokens at 50/s
    assert SCENARIO.capacity_rps == pytest.approx(16 / 0.48)
    assert SCENARIO.loops == {"a": 32, "b": 8} and SCENARIO.offered == 2.5
    # As the gateway's slots_for: floor(cap x reserve) kept for high priority, at least one left.
    assert SCENARIO.normal_slots(0.25) == 3
    assert SCENARIO.normal_slots(None) == 4  # the default 0.1 keeps none of 4
    assert AdmissionScenario(max_inflight=10).normal_slots(None) == 9
    assert AdmissionScenario(max_inflight=1).normal_slots(0.9) == 1
    for bad in ({"clients": 0}, {"min_tokens": 40}, {"reserve": 1.0}, {"warmup_s": 60.0}):
        with pytest.raises(ValueError):
            AdmissionScenario(**bad)
    judged = setups(0.25)["admission"]
    idle = idle_setup(judged)
    assert (idle.capped, idle.reserve, idle.loops) == (True, 0.25, False)
    assert not setups(0.25)["none"].capped and setups(0.25)["default-reserve"].reserve is None


def test_high_arrivals_are_the_same_for_a_seed_and_a_poisson_stream_at_their_rate() -> None:
    long = AdmissionScenario(duration_s=600.0)
    schedule = high_schedule(3, long)
    assert schedule == high_schedule(3, long) and schedule != high_schedule(4, long)
    times = [a.at for a in schedule]
    assert times == sorted(times) and 0 < times[0] and times[-1] < long.duration_s
    expected = long.high_rate_rps * long.duration_s
    assert abs(len(schedule) - expected) < 4 * math.sqrt(expected)
    assert {a.replica for a in schedule} == {0, 1}
    assert all(long.min_tokens <= a.tokens <= long.max_tokens for a in schedule)


def test_an_answer_a_refusal_with_retry_after_and_anything_else_are_told_apart() -> None:
    assert Outcome("a", 0.0, 16, 0, ok=True, status=200).fate == "answered"
    assert Outcome("a", 0.0, 16, 0, status=429, retry_after="3").fate == "refused"
    assert Outcome("a", 0.0, 16, 0, status=503, retry_after="3").fate == "refused"
    assert Outcome("a", 0.0, 16, 0, status=503).fate == "lost"  # no Retry-After
    assert Outcome("a", 0.0, 16, 0, status=500, retry_after="3").fate == "lost"
    assert Outcome("a", 0.0, 16, 0, status=200, error="broken stream").fate == "lost"
    assert Outcome("a", 0.0, 16, 0).fate == "lost"  # no answer at all: a timeout


def _ok(key: str, sent: float, done: float, **kw: Any) -> Outcome:
    return Outcome(key, sent, 16, 0, done=done, status=200, ok=True, **kw)


def test_a_run_counts_throughput_in_the_window_and_what_became_of_every_request() -> None:
    outcomes = [
        *(_ok("a", t - 0.5, t) for t in (4.0, 6.0, 7.0, 8.0, 19.5, 21.0)),  # 4 end in [5, 20)
        *(_ok("b", t - 0.5, t, queued_ms=100.0) for t in (6.0, 9.0, 12.0, 15.0, 18.0)),
        _ok("high", 6.0, 6.5, ttft=0.02),
        _ok("high", 7.0, 7.5, ttft=0.04, queued_ms=3.0),
        Outcome("high", 8.0, 16, 1),  # never answered: lost
        Outcome("a", 9.0, 16, 0, done=9.1, status=429, retry_after="1"),
        Outcome("b", 9.0, 16, 0, done=9.1, status=503, error="HTTP 503"),  # no Retry-After: lost
    ]
    stats = {
        "node-1": {"peak": 4, "served": 7, "idle_gaps": [[1005.0, 2.0, 1], [1006.0, 900.0, 3]]},
        "node-2": {"peak": 3, "served": 6, "idle_gaps": [[1001.0, 50.0, 0], [1030.0, 1.0, 0]]},
    }
    page = (
        'fleetgate_admissions_total{how="queued"} 5\nfleetgate_admissions_total{how="direct"} 2\n'
        'fleetgate_queue_refusals_total{reason="full"} 1\nfleetgate_queue_depth{model="m",'
        'priority="normal"} 7\n'
    )
    run = summarize_run(
        outcomes,
        (5.0, 20.0),
        stats,
        wall0=1000.0,
        open_below=3,
        pages=[page, page],
        samples=[(1.0, 2.0), (6.0, 10.0), (8.0, 20.0), (21.0, 0.0)],
    )
    assert (run["sent"], run["answered"], run["refused_429"], run["lost"]) == (16, 13, 1, 2)
    assert run["lost_kinds"] == {"never ended": 1, "HTTP 503": 1}
    assert run["throughput_a"] == pytest.approx(4 / 15) and run["throughput_b"] == 1 / 3
    assert run["throughput_ratio"] == pytest.approx((1 / 3) / (4 / 15))
    assert run["queued_share_a"] == 0.0 and run["queued_share_b"] == 1.0
    assert run["high_sent"] == 3 and run["high_answered"] == 2
    assert run["high_ttft_p50_ms"] == pytest.approx(30.0)
    assert run["high_queue_wait_p90_ms"] == pytest.approx(2.7)
    assert run["peaks"] == {"node-1": 4, "node-2": 3} and run["peak_max"] == 4
    # In the window (wall 1005-1020): 2 ms and 900 ms; only 2 ms found fewer than 3 running.
    assert (run["gap_count"], run["open_gap_count"], run["open_gap_p99_ms"]) == (2, 1, 2.0)
    assert run["gateway"] == {"admitted_queued": 10, "admitted_direct": 4, "queue_refused_full": 2}
    assert run["depth_mean"] == 15.0
    assert run["served_by_nodes"] == 13
    assert run["by_key"]["b"] == {"sent": 6, "answered": 5}
    assert len(run["series"]["a"]) == 11  # 2 s bins up to the last answer at 21 s


def test_figures_helpers() -> None:
    assert math.isnan(ratio([1.0, 0.0])) and math.isnan(ratio([])) and ratio([2.0, 1.6]) == 1.25
    outcomes = [_ok("a", 0.0, t) for t in (0.5, 1.5, 2.5)]
    assert throughput(outcomes, "a", 1.0, 3.0) == 1.0
    assert series(outcomes, "a", 4.0, 2.0) == [1.0, 0.5]
    figures = gap_figures([[10.0, 5.0, 0], [11.0, 15.0, 9]], 0.0, 20.0, 10**9)
    assert figures["open_gap_count"] == figures["gap_count"] == 2  # uncapped: every slot open
    assert queue_depth('fleetgate_queue_depth{priority="high"} 2\nfleetgate_queue_depth 3\n') == 5
    assert gateway_counts(['fleetgate_admissions_total{how="local"} x\n']) == {}


def _run(**figures: float) -> dict[str, Any]:
    base = {
        "peak_max": 4.0,
        "high_ttft_p90_ms": 30.0,
        "throughput_ratio": 1.05,
        "throughput_a": 10.0,
        "throughput_b": 10.5,
        "open_gap_p99_ms": 5.0,
        "gap_p99_ms": 900.0,
        "lost": 0.0,
        "answered": 100.0,
        "refused_429": 0.0,
        "refused_503": 0.0,
        "sent": 100.0,
    }
    return {**base, **figures}


def _result(admission: list[dict[str, Any]], none: list[dict[str, Any]]) -> dict[str, Any]:
    idle = [_run(high_ttft_p90_ms=25.0) for _ in admission]
    return {
        "scenario": {"max_inflight": 4},
        "idle": {"runs": idle},
        "setups": {"admission": {"runs": admission}, "none": {"runs": none}},
    }


def test_targets_are_judged_on_admission_run_by_run_with_the_other_set_up_beside() -> None:
    result = _result(
        [_run(), _run(high_ttft_p90_ms=50.0), _run(open_gap_p99_ms=12.0, lost=1.0)],
        [_run(peak_max=11.0, high_ttft_p90_ms=900.0, throughput_ratio=4.0)],
    )
    targets = evaluate_admission(result)
    assert list(targets) == [PEAK, TTFT, FAIR, GAP, LOST]
    assert targets[PEAK]["holds"] and targets[PEAK]["bound"] == "<= 4"
    assert targets[TTFT]["runs"] == [1.2, 2.0, 1.2] and targets[TTFT]["figure"] == 1.2
    assert targets[TTFT]["holds"]
    assert targets[FAIR]["holds"] and targets[GAP]["figure"] == 5.0 and targets[GAP]["holds"]
    assert targets[LOST]["figure"] == 1 and not targets[LOST]["holds"]  # all runs add up
    assert targets[PEAK]["others"]["none"].startswith("11 of 4")
    assert targets[TTFT]["others"]["none"].startswith("36.00x")
    result["setups"]["admission"]["runs"][0]["peak_max"] = 5.0
    assert not evaluate_admission(result)[PEAK]["holds"]  # the worst run decides
    assert evaluate_admission({"setups": {"none": {"runs": [_run()]}}}) == {}
    del result["idle"]
    assert TTFT not in evaluate_admission(result)


def test_medians_tables_and_the_json_line() -> None:
    window = (5.0, 20.0)
    stats = {"node-1": {"peak": 4, "served": 1, "idle_gaps": []}}
    higher = {"node-1": {**stats["node-1"], "peak": 5}}
    runs = [
        summarize_run(
            [_ok("a", 6.0, 7.0), _ok("b", 6.0, 8.0)], window, stats, wall0=0, open_below=3
        ),
        summarize_run(
            [_ok("a", 6.0, 7.0), Outcome("b", 6.0, 16, 0)], window, higher, wall0=0, open_below=3
        ),
    ]
    median = median_runs(runs)
    assert median["peak_max_any_run"] == 5 and median["peak_max"] == 4.5
    assert median["lost_total"] == 1 and median["lost_kinds_total"] == {"never ended": 1}
    row = {"label": "x", "loops": True, "runs": runs, "median": median}
    result = {
        "runs": 2,
        "scenario": {**SCENARIO.describe(), "max_inflight": 4},
        "idle": {**row, "label": "idle", "loops": False},
        "setups": {"admission": row},
        "elapsed_s": 1.0,
    }
    result["targets"] = evaluate_admission(result)
    line = admission_summary_line(result)
    json.dumps(line, allow_nan=False)
    assert set(line["setups"]) == {"idle", "admission"}
    assert line["setups"]["idle"]["throughput_a"] is None  # no loops: no throughput
    assert line["setups"]["admission"]["throughput_a"] == 0.0667  # 1 answer over 15 s
    assert set(line["targets"]) == {PEAK, TTFT, FAIR, GAP, LOST}
    assert set(line["targets"][PEAK]) == {"figure", "bound", "holds"}
    head, rows = request_rows(result)
    assert len(rows) == 2 and all(len(r) == len(head) for r in rows)
    assert rows[0][6] == "-"  # the idle fleet has no throughput of its own
    head, rows = latency_rows(result)
    assert "node-1 peak" in head and rows[1][head.index("node-1 peak")] == "5"


def test_options_fill_the_quick_defaults_and_put_the_judged_set_up_first() -> None:
    p = parser("doc")
    args = p.parse_args(["--quick", "--setups", "none,admission"])
    settle(p, args)
    assert (args.runs, args.duration, args.warmup) == (1, 6.0, 2.0)
    assert [s.key for s in args.setup_list] == ["admission", "none"]
    assert args.scenario.duration_s == 6.0
    args = p.parse_args(["--duration", "30"])
    settle(p, args)
    assert (args.runs, args.scenario.duration_s, args.scenario.warmup_s) == (3, 30.0, 5.0)
    for bad in (["--setups", "bogus"], ["--warmup", "100"], ["--runs", "0"]):
        with pytest.raises(SystemExit):
            settle(p, p.parse_args(bad))
