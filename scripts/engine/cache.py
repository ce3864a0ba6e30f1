"""Where real engines and their models are kept, and the few safe steps every engine's
preparation is made of.

Invariants:

- Everything lives under one cache root outside the repository: ``$FLEETGATE_ENGINES_CACHE``
  or else ``~/.cache/fleetgate/engines``. Each engine keeps a folder named by its pinned
  version, so a new pin never reuses an old build and an old one is never rebuilt.
- A finished artefact appears only by an atomic rename, after it is complete: a file that
  exists is whole, whatever was killed while making it. What is half-made stays in a
  ``.partial`` name and is redone.
- Two processes never make the same artefact at once: each preparation holds an exclusive
  ``flock`` on a lock file beside it, waits for it at most a bounded time, and looks again
  for the finished file once it holds it (the other process may have made it meanwhile).
- Every child process runs under a timeout and with its output in a log file: a step that
  cannot be done raises :class:`EngineUnavailable` with a one-line reason, never hangs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ENV_VAR = "FLEETGATE_ENGINES_CACHE"
DEFAULT_ROOT = Path("~/.cache/fleetgate/engines")
LOCK_WAIT_S = 3600.0  # a build on two cores takes minutes; another process may be doing it
_LOG_TAIL_LINES = 8


class EngineUnavailable(Exception):
    """An engine or model cannot be prepared here; ``str()`` is a one-line reason."""


Progress = Callable[[str], None]


def say(text: str) -> None:
    """The default progress report: one line on stderr (stdout carries the result)."""
    print(text, file=sys.stderr, flush=True)


def root() -> Path:
    """The cache root (created on demand by the steps that write to it)."""
    configured = os.environ.get(ENV_VAR, "").strip()
    return Path(configured).expanduser() if configured else DEFAULT_ROOT.expanduser()


def partial(path: Path) -> Path:
    """The name ``path`` is made under until it is complete."""
    return path.with_name(path.name + ".partial")


def publish(made: Path, path: Path) -> Path:
    """Give the complete ``made`` its final name ``path`` at once (same folder: a rename)."""
    os.replace(made, path)
    return path


@contextlib.contextmanager
def locked(lock_path: Path, what: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (a file made for it) while the block runs.

    Waits at most ``wait_s`` for another holder (polling: ``flock`` itself has no timeout),
    then gives up with :class:`EngineUnavailable`. The kernel drops the lock when its holder
    dies, so a killed build never wedges the next one.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise EngineUnavailable(
                    f"{what}: another process held {lock_path} for more than {wait_s:.0f} s"
                )
            if not told:
                say(f"{what}: another process is preparing it; waiting")
                told = True
            time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def require_tool(name: str, why: str, *alternatives: str) -> str:
    """The path of the program ``name`` (or the first of ``alternatives`` found); if none is on
    PATH, :class:`EngineUnavailable` naming it and what it is for."""
    for candidate in (name, *alternatives):
        found = shutil.which(candidate)
        if found:
            return found
    names = " or ".join((name, *alternatives))
    raise EngineUnavailable(f"{names} not found on PATH (needed to {why})")


def _tail(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    meaningful = [line.strip() for line in lines if line.strip()]
    return " | ".join(meaningful[-_LOG_TAIL_LINES:])


def run(
    args: Sequence[str],
    *,
    step: str,
    log_path: Path,
    timeout_s: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run one step of a preparation, its output appended to ``log_path``.

    A missing program, a non-zero exit or a step still running after ``timeout_s`` (its whole
    process group is killed then) raises :class:`EngineUnavailable` with the step, the cause,
    the log's last lines and the log's path, on one line.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(args)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # a timeout kills the compilers it started too
            )
        except OSError as exc:
            raise EngineUnavailable(f"{step}: cannot run {args[0]}: {exc.strerror}") from None
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 9)
            proc.wait()
            raise EngineUnavailable(
                f"{step}: no result after {timeout_s:.0f} s, stopped (log: {log_path})"
            ) from None
        except BaseException:  # ^C: the step's whole group goes with us
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 9)
            proc.wait()
            raise
    if code != 0:
        tail = _tail(log_path)
        raise EngineUnavailable(
            f"{step}: exit status {code}: {tail[-600:]} (log: {log_path})"
            if tail
            else f"{step}: exit status {code} (log: {log_path})"
        )
