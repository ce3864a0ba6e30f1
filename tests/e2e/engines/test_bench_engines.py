"""A smoke run of the routing benchmark's scenario on real engines (``bench_routing.py --engines
llama``), small enough for CI: two ``llama-server``s with the tiny model, a real Redis, two
gateway replicas sharing it and a health-checker, a dozen chat turns for ``round_robin`` and
``cache_aware``. The figures of so short a run mean nothing; that it runs end to end does, and
so does what must hold in any run: no turn fails, and the engines' own counters add up to the
prompt and cached tokens their answers reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.engines import LlamaBuild

pytestmark = pytest.mark.engines

ROOT = Path(__file__).resolve().parents[3]


def test_the_engine_scenario_runs_end_to_end(llama_build: LlamaBuild, tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "scripts" / "bench_routing.py"), "--engines", "llama"]
    command += ["--quick", "--engine-model", llama_build.name, "--engine-replicas", "2"]
    command += ["--engine-rate", "4", "--engine-requests", "12", "--engine-warmup", "2"]
    command += ["--chat-prompt-words", "200", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["bench"] == "routing-engines"
    assert set(line["comparison"]) == {"round_robin/2-shared", "cache_aware/2-shared"}
    saved = json.loads((tmp_path / "engines.json").read_text())
    assert (tmp_path / "engines.md").read_text().startswith("# Routing on real engines")
    for key, row in saved["comparison"].items():
        (run,) = row["runs"]
        assert run["errors"] == 0 and run["requests"] == 10, (key, run["error_samples"])
        assert run["engine_prompt_tokens"] == run["usage_prompt_tokens_whole_run"] > 0
        assert run["engine_cached_tokens"] == run["usage_cached_tokens_whole_run"]
        assert sum(run["shares"].values()) == pytest.approx(1.0)
