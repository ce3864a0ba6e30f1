"""A smoke run of the admission benchmark (scripts/bench_admission.py), small enough for CI: its
four simulated nodes, a real Redis, two gateway replicas, the idle fleet's high-priority stream
and both set-ups under load, each for a few seconds. The figures of so short a run mean little;
that it runs end to end does, and so does what must hold in any run: with admission no node
ever holds more than its max_inflight, without it the nodes hold more, and no request is lost.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {
    "sent",
    "answered",
    "refused_429",
    "refused_503",
    "lost_total",
    "throughput_a",
    "throughput_b",
    "throughput_ratio",
    "high_ttft_p50_ms",
    "high_ttft_p90_ms",
    "queue_wait_p50_ms",
    "queue_wait_p90_ms",
    "queue_wait_p99_ms",
    "peak_max_any_run",
    "open_gap_p50_ms",
    "open_gap_p99_ms",
    "gap_p99_ms",
}
TARGETS = {
    "no node runs more than its max_inflight",
    "high priority: p90 TTFT vs the idle fleet",
    "keys of equal share: throughput while both are backlogged",
    "freed slot idle while requests wait, p99",
    "every request answered or refused with Retry-After",
}


def test_the_admission_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "scripts" / "bench_admission.py"), "--quick"]
    command += ["--duration", "4", "--warmup", "1", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["bench"] == "admission" and line["runs"] == 1 and line["duration_s"] == 4
    assert set(line["setups"]) == {"idle", "admission", "none"}
    for key, figures in line["setups"].items():
        assert set(figures) == FIGURES, key
        assert figures["lost_total"] == 0 and figures["answered"] > 0, (key, figures)
    assert set(line["targets"]) == TARGETS
    for target in line["targets"].values():
        assert set(target) == {"figure", "bound", "holds"} and isinstance(target["holds"], bool)
    assert line["setups"]["admission"]["peak_max_any_run"] <= 4
    assert line["setups"]["none"]["peak_max_any_run"] > 4  # 40 loops on 16 slots
    assert line["targets"]["no node runs more than its max_inflight"]["holds"]
    assert line["setups"]["admission"]["throughput_a"] > 0
    assert line["setups"]["admission"]["throughput_b"] > 0
    saved = json.loads((tmp_path / "admission.json").read_text())
    assert saved["targets"].keys() == TARGETS
    assert (tmp_path / "admission.md").read_text().startswith("# Fleet-wide admission benchmark")
    # The chart needs the bench extra (matplotlib); without it the script says so and goes on.
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "admission.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in done.stderr
        assert not (tmp_path / "admission.png").exists()
