"""The benchmarks' process harness: child processes started, watched and stopped as one group,
free loopback ports, and a throwaway redis-server (also used by the tests and local runs)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0
LOG_MARKS = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")


class StartupError(Exception):
    """Something the benchmark needs did not start."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: stop at the next step and clean up."""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt, so that a terminated run cleans up as after ^C."""
    signal.signal(signal.SIGTERM, _interrupt)


def progress(text: str) -> None:
    """One progress line on stderr (stdout carries the report)."""
    print(text, file=sys.stderr, flush=True)


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process was given before: several picked in a row
    before any is bound must differ (the kernel may offer a just-released port again)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    """Return once something accepts connections on ``host:port``; TimeoutError after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s")


@dataclass
class Child:
    """One started subprocess, the file it logs to and the loopback port it serves on (0: none)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        """Everything it logged so far ("" if the log cannot be read)."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines it logged."""
        return "\n".join(self.text().splitlines()[-lines:])

    def findings(self, expected: Iterable[str] = ()) -> list[str]:
        """Warnings, errors and tracebacks it logged, minus lines holding an ``expected`` part."""
        expected = tuple(expected)
        return [
            line
            for line in self.text().splitlines()
            if any(m in line for m in LOG_MARKS) and not any(e in line for e in expected)
        ]


def log_findings(children: Iterable[Child], expected: Iterable[str] = ()) -> list[str]:
    """``name: line`` for each warning, error and traceback the children logged, minus the
    lines holding an ``expected`` part."""
    expected = tuple(expected)
    return [f"{c.name}: {line.strip()}" for c in children for line in c.findings(expected)]


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # After "pid (comm) ", fields start at "state" (field 3): utime is 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Processes:
    """Subprocesses of this run, each logging to its own file; :meth:`close` stops them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self._files: list[IO[bytes]] = []
        self._seq = 0

    def start(
        self,
        name: str,
        argv: Sequence[str],
        port: int = 0,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> Child:
        """Start ``argv`` in the repository root (or ``cwd``), its output to a log file of its
        own; ``env`` adds to this process's environment."""
        self._seq += 1
        log = self.log_dir / f"{self._seq:04d}-{name}.log"
        out = log.open("wb")
        self._files.append(out)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd, env=env
        )
        child = Child(name, proc, log, port)
        self.children.append(child)
        return child

    def wait_port(self, child: Child, timeout_s: float = START_TIMEOUT_S) -> None:
        """Return once ``child`` listens on its port; StartupError if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not child.alive():
                raise StartupError(
                    f"{child.name} exited with status {child.proc.returncode}:\n{child.tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", child.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.03)
        raise StartupError(f"{child.name} does not listen on port {child.port}:\n{child.tail()}")

    def stop(self, children: Iterable[Child], timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; all at once, then wait for each."""
        children = list(children)
        for child in children:
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
        for child in children:
            try:
                child.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(timeout=10)

    def kill(self, child: Child) -> None:
        """kill -9: what a crash looks like to everyone else."""
        if child.alive():
            child.proc.kill()
            child.proc.wait(timeout=10)

    def close(self) -> None:
        """Stop every child, the last started first, and close their logs."""
        self.stop(reversed(self.children))
        for f in self._files:
            f.close()


async def script_stats(client: Any) -> tuple[float, float]:
    """(calls, microseconds) of Lua scripts on a Redis server so far. Only EVALSHA and EVAL
    are counted: commandstats also counts the commands scripts run inside them."""
    stats = await client.info("commandstats")
    calls = usec = 0.0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        if name in stats:
            calls += float(stats[name]["calls"])
            usec += float(stats[name]["usec"])
    return calls, usec


class RedisServer:
    """A throwaway redis-server process without persistence, on loopback."""

    def __init__(self, *extra: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it)")
        self.exe = exe
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="fleetgate-redis-"))
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it and return once it accepts connections."""
        self.proc = subprocess.Popen(
            [
                self.exe,
                *self.extra,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def pause(self) -> None:
        """SIGSTOP: the server hangs, its port stays open."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: it serves again after :meth:`pause`."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """kill -9 it (a later :meth:`start` brings it back, empty, on the same port)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        """Stop it and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
