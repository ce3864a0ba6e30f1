"""Real processes for end-to-end tests: simulated nodes and gateway replicas on loopback, the
ops commands as an operator runs them, and a self-signed certificate made with openssl."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.support import MODEL, ROOT
from tests.support.harness import free_port, wait_for_port

# A test process gets SIGKILL when the thread that started it ends: a pytest run killed (or
# timed out) before its fixtures could stop the processes leaves none of them serving. Linux's
# parent-death signal, set by util-linux's setpriv before it execs the command; only from the
# main thread, whose end is the run's (a worker thread's would end the child too early).
_DIE_WITH_TESTS = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def die_with_tests() -> list[str]:
    return _DIE_WITH_TESTS if threading.current_thread() is threading.main_thread() else []


class Process:
    """A child process with its output kept in a file for post-mortems.

    It leads a session and process group of its own, and :meth:`kill` ends the whole group:
    what it started (hypercorn's workers, say) goes with it even when it is dead already.
    """

    def __init__(
        self, args: Sequence[str], log_name: str, env: dict[str, str] | None = None
    ) -> None:
        self.args = list(args)
        self.log_path = (
            Path(os.environ.get("TMPDIR", "/tmp")) / f"fleetgate-test-{log_name}-{os.getpid()}.log"
        )
        self.log = self.log_path.open("wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [*die_with_tests(), *self.args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=full_env,
            start_new_session=True,
        )

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group, and reap the leader."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self, timeout_s: float = 10.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def close(self) -> None:
        self.kill()
        self.log.close()
        self.log_path.unlink(missing_ok=True)


class SimNode(Process):
    """``python -m gateway.sim.node`` on a free loopback port, started and listening (unless
    ``listening`` is False: a node still loading, say ``--flavor vllm --loading-s 2``, whose
    port refuses connections until it has loaded, or one of several started together, each
    then waited for with :meth:`wait_listening`)."""

    def __init__(self, *flags: str, name: str = "sim", listening: bool = True) -> None:
        self.port = free_port()
        super().__init__(
            [sys.executable, "-m", "gateway.sim.node", "--port", str(self.port), *flags],
            f"{name}-{self.port}",
        )
        self.url = f"http://127.0.0.1:{self.port}"
        if listening:
            self.wait_listening()

    def wait_listening(self) -> SimNode:
        wait_for_port(self.port)
        return self

    def fault(self, mode: str, **extra: object) -> None:
        httpx.post(
            f"{self.url}/sim/fault", json={"mode": mode, **extra}, timeout=5
        ).raise_for_status()

    def stats(self) -> dict[str, Any]:
        """The node's ``/sim/stats``: counters, its fault, and ``pd`` (its PD engine's figures)."""
        response = httpx.get(f"{self.url}/sim/stats", timeout=5)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data


class Gateway(Process):
    """``python -m gateway`` on a free loopback port, started and listening (unless
    ``listening`` is False: one of several started together, each then waited for with
    :meth:`wait_listening`, so that their start-ups overlap)."""

    def __init__(
        self,
        *flags: str,
        name: str = "gw",
        env: dict[str, str] | None = None,
        listening: bool = True,
    ) -> None:
        self.port = free_port()
        super().__init__(
            [sys.executable, "-m", "gateway", "--port", str(self.port), *flags],
            f"{name}-{self.port}",
            env,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        if listening:
            self.wait_listening()

    def wait_listening(self) -> Gateway:
        try:
            wait_for_port(self.port, timeout_s=20)
        except TimeoutError:
            raise RuntimeError(f"gateway did not start:\n{self.output()}") from None
        return self

    def wait_models(self, model: str, timeout_s: float = 10.0) -> None:
        """Wait until the gateway lists ``model`` (its --node registrations are done)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            listing = httpx.get(f"{self.url}/v1/models", timeout=5).json()
            if any(m["id"] == model for m in listing["data"]):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.url} never listed {model}:\n{self.output()}")


class Checker(Process):
    """``fleetgate health-checker`` on ``redis_url`` with fast rounds, its metrics server
    listening; ``flags`` add to (or override) the defaults."""

    def __init__(self, redis_url: str, checker_id: str, *flags: str) -> None:
        self.metrics_port = free_port()
        self.checker_id = checker_id
        super().__init__(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "health-checker",
                "--redis-url",
                redis_url,
                "--checker-id",
                checker_id,
                "--interval",
                "0.2",
                "--lease-seconds",
                "1",
                "--metrics-port",
                str(self.metrics_port),
                *flags,
            ],
            f"checker-{checker_id}",
        )
        try:
            wait_for_port(self.metrics_port, timeout_s=20)
        except TimeoutError:
            raise RuntimeError(f"checker did not start:\n{self.output()}") from None

    def leads(self) -> bool:
        """Whether it says it leads (its ``/health``)."""
        answer = httpx.get(f"http://127.0.0.1:{self.metrics_port}/health", timeout=5)
        return bool(answer.json()["leader"])

    def metric(self, name: str) -> float:
        """The sum of every sample of metric ``name`` (any labels) on its ``/metrics``."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


def children_of(pid: int) -> list[int]:
    """Ids of the live processes whose parent is ``pid`` (read from /proc; zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its end.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


Listening = TypeVar("Listening", SimNode, Gateway)


def together(procs: list[Process], started: list[Listening]) -> list[Listening]:
    """``started`` (made with ``listening=False``, so their start-ups overlap) added to
    ``procs``, then each waited for until it listens."""
    procs += started
    for process in started:
        process.wait_listening()
    return started


def replicas_of(
    procs: list[Process], redis_url: str, node: SimNode, count: int = 2
) -> list[Gateway]:
    """``count`` gateway replicas sharing ``redis_url``, each started with ``--node``, ready."""
    flags = ("--redis-url", redis_url, "--node", node.url)
    replicas = together(procs, [Gateway(*flags, listening=False) for _ in range(count)])
    for gateway in replicas:
        gateway.wait_models(MODEL)
    return replicas


def ops(redis_url: str, *args: str, script: bool = False) -> subprocess.CompletedProcess[str]:
    """Run an ops command as an operator would: ``fleetgate ...`` or ``scripts/<group>.py``."""
    command = (
        [sys.executable, str(ROOT / "scripts" / f"{args[0]}.py"), *args[1:]]
        if script
        else [sys.executable, "-m", "gateway.cli", *args]
    )
    env = {**os.environ, "FLEETGATE_REDIS_URL": redis_url}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made here; it is its own CA bundle."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
