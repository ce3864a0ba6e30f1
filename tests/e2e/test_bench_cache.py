"""A smoke run of the cache benchmark (scripts/bench_cache.py) on simulated nodes, small enough
for CI: four nodes with a prefix cache, a real Redis, ``cache_aware`` on one replica and on four
sharing it, six short chats. The figures of so short a run mean nothing; that it runs end to
end does, and so does what must hold in any run: no turn fails, the nodes' own counters add up
to the prompt and cached tokens their answers reported, and the chats hit their system prompts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_cache_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "scripts" / "bench_cache.py"), "--quick"]
    command += ["--parts", "chats", "--conversations", "6", "--prompt-words", "200"]
    command += ["--warmup-turns", "2", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["bench"] == "cache"
    assert set(line["scenarios"]["chats"]) == {"cache_aware/1-replica", "cache_aware/4-shared"}
    saved = json.loads((tmp_path / "cache.json").read_text())
    assert (tmp_path / "cache.md").read_text().startswith("# Cache-aware routing benchmark")
    for key, row in saved["scenarios"]["chats"]["comparison"].items():
        (run,) = row["runs"]
        assert run["errors"] == 0 and run["requests"] > 0, (key, run["error_samples"])
        assert run["node_prompt_tokens"] == run["usage_prompt_tokens_whole_run"] > 0
        assert run["node_cached_tokens"] == run["usage_cached_tokens_whole_run"] > 0
        assert run["hit_rate"] > 0.5  # later turns find at least their system prompt
        assert sum(run["shares"].values()) == pytest.approx(1.0, abs=0.001)  # rounded shares
    assert "chats: cache_aware, 4 sharing vs 1 replica: hit rate" in saved["targets"]
