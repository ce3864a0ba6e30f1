"""A smoke run of the gateway benchmark (scripts/bench_gateway.py) with ``--baseline``: the
instant node, a real Redis, this tree's gateway, the gateway of a commit's tree exported by
``git archive`` (here HEAD's, with another strategy) and the trivial ceiling, each load for a
fraction of a second. The figures of so short a run mean little; that every path answers
without an error and that the report compares this tree with the baseline's in the same run
does. A revision that names no commit stops the run with git's reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = [sys.executable, str(ROOT / "scripts" / "bench_gateway.py")]
SHORT = ["--runs", "1", "--duration", "0.5", "--warmup", "0.2", "--latency-requests", "20"]
COST = {
    "added_p50_ms",
    "added_p99_ms",
    "rps_vs_off",
    "sse_vs_off",
    "cpu_us_off",
    "cpu_us_on",
    "cpu_vs_off",
}


def test_the_gateway_benchmark_compares_this_tree_with_a_commits() -> None:
    command = [*BENCH, *SHORT, "--strategy", "cache_aware", "--baseline", "HEAD"]
    command += ["--baseline-strategy", "round_robin"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["bench"] == "gateway" and line["runs"] == 1
    for path in ("direct", "gateway", "baseline", "trivial"):
        assert line[path]["rps"] > 0 and 0 < line[path]["p50"] <= line[path]["p99"], path
    assert line["gateway"]["cpu_us"] > 0 and line["baseline"]["cpu_us"] > 0
    assert line["errors"] == {"direct": 0, "gateway": 0, "baseline": 0, "trivial": 0}
    assert not any(line["log_findings"].values()), done.stdout
    against = line["against_baseline"]
    assert set(against) == COST | {"revision", "strategy"}
    assert against["revision"] == "HEAD" and against["strategy"] == "round_robin"
    rps_ratio = line["gateway"]["rps"] / line["baseline"]["rps"]  # of figures rounded to 0.1
    assert abs(against["rps_vs_off"] - rps_ratio) < 0.01
    assert "this tree vs HEAD with round_robin (same run, median of 1)" in done.stdout
    assert "strategy cache_aware" in done.stdout.splitlines()[0]


def test_a_baseline_that_names_no_commit_stops_the_run_with_the_reason() -> None:
    command = [*BENCH, *SHORT, "--baseline", "no-such-revision"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1
    assert "start-up failed: --baseline no-such-revision:" in done.stderr
    assert "Traceback" not in done.stderr
