"""``scripts/engines.py`` where an engine cannot be prepared: a missing build tool or a failed
download ends at once with exit status 1 and one line saying why, a step past its timeout is
stopped with all it started, and a second preparer waits for the lock only so long. Nothing
here builds an engine (that is tests/e2e/engines); each test has a cache root of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.engine import cache
from tests.support import ROOT
from tests.support.processes import running

SCRIPT = str(ROOT / "scripts" / "engines.py")


def engines(cache_root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, cache.ENV_VAR: str(cache_root), **env},
    )


def test_build_without_cmake_fails_at_once_with_the_reason(tmp_path: Path) -> None:
    # Only this Python's folder on PATH: no cmake, no compiler.
    result = engines(tmp_path, "build", "llama", PATH=str(Path(sys.executable).parent))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cmake not found on PATH" in lines[0], result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "llama-cpp-python-0.3.36" / "download").exists()  # nothing fetched


def test_a_failed_download_fails_with_the_reason(tmp_path: Path) -> None:
    # pip without its configuration, asking an index nobody serves: the download fails.
    offline = {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_FIND_LINKS": "",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_RETRIES": "0",
    }
    result = engines(tmp_path, "model", "llama-tiny", **offline)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("engines: downloading llama-cpp-python==0.3.36: exit status 1"), last
    assert "No matching distribution" in last and "download.log" in last
    assert not list(tmp_path.rglob("*.gguf"))


def test_unknown_names_are_refused(tmp_path: Path) -> None:
    result = engines(tmp_path, "model", "llama-huge")
    assert result.returncode == 1 and "unknown model 'llama-huge'" in result.stderr
    assert engines(tmp_path, "build", "nothing").returncode == 2  # argparse's usage error


def test_a_step_past_its_timeout_is_stopped_with_what_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(cache.EngineUnavailable, match=r"no result after 1 s, stopped"):
        cache.run(
            ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"],
            step="a slow step",
            log_path=tmp_path / "step.log",
            timeout_s=1.0,
        )
    assert time.monotonic() - started < 30  # bounded; not a claim on speed
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child)  # the step's own child went with it


def test_a_second_preparer_waits_for_the_lock_only_so_long(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    with holder:  # closes its pipe and reaps it
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            with (
                pytest.raises(cache.EngineUnavailable, match="another process held"),
                cache.locked(lock, "the thing", wait_s=0.5),
            ):
                pass
        finally:
            holder.kill()
            holder.wait(timeout=10)
    with cache.locked(lock, "the thing", wait_s=5):  # the holder died: the kernel freed it
        pass
