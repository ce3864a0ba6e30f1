"""Fixtures of the end-to-end tests: a real redis-server for the session, flushed before each
test that asks for it, Store clients on it, the child processes a test starts, and a
self-signed certificate for TLS on loopback."""

from __future__ import annotations

import fcntl
import gc
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.support.harness import RedisServer
from tests.support.processes import Process, make_certificate
from tests.support.store import StoreFactory


@pytest.fixture(scope="session")
def collections_skip_what_was_there_before_the_tests() -> Iterator[None]:
    """Freeze what exists before the first test (every module imported, every test collected:
    some 300,000 objects), so that the full collection after each test walks only what the
    tests made since, all of which it still finds: a quarter of a second less per test."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def leaks_stay_with_their_test(
    collections_skip_what_was_there_before_the_tests: None,
) -> Iterator[None]:
    """Collect garbage after each test, so a socket or client it left open (often one that
    failed before closing it) is reported by that test, not by whichever later test the
    collector happens to run in (warnings are errors here)."""
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def machine_share(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Under pytest-xdist, an end-to-end test marked ``exclusive`` (vLLM at work takes both
    cores of a 2-core machine) runs while no other end-to-end test runs on the other worker,
    and the others run side by side: a shared lock for these, an exclusive one for those, on
    one file in the folder the workers' temporary folders share (one per test run, which
    pytest clears with it). Beside vLLM's load a replica once waited over 0.5 s for a Redis
    reply, and niced vLLM missed its own deadlines instead. In one process there is nothing
    to share."""
    if not hasattr(request.config, "workerinput"):
        yield
        return
    mode = fcntl.LOCK_EX if request.node.get_closest_marker("exclusive") else fcntl.LOCK_SH
    with open(tmp_path_factory.getbasetemp().parent / "machine-share.lock", "a") as lock:
        fcntl.flock(lock, mode)  # released when the file closes, after the test's teardown
        yield


# The processes of the running test (see procs), for the post-mortem of a failed test.
STARTED = pytest.StashKey[list[Process]]()
POST_MORTEM_LINES = 60


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A test that failed (or erred) in its set-up or call shows, beside its own output, the
    last lines each process it started wrote: read now, before the processes are stopped and
    their logs removed. A flake seen once in CI is then seen whole in its report."""
    report = yield
    started = item.stash.get(STARTED, [])
    if report.failed and report.when != "teardown":
        for proc in started:
            lines = proc.output().splitlines()[-POST_MORTEM_LINES:]
            report.sections.append((f"{proc.log_path.name}, last lines", "\n".join(lines)))
    return report


@pytest.fixture
def procs(request: pytest.FixtureRequest) -> Iterator[list[Process]]:
    """Processes a test starts; all stopped when it ends, last started first."""
    started: list[Process] = []
    request.node.stash[STARTED] = started
    yield started
    for proc in reversed(started):
        proc.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> AsyncIterator[str]:
    """The session's Redis, flushed before the test."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    yield redis_server.url


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, self-signed: the certificate is its own CA bundle."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=["redis"])
async def store_factory(redis_url: str) -> AsyncIterator[StoreFactory]:
    """Store clients on the session's Redis (the ``redis`` id: tests/unit runs the same tests
    on the embedded store)."""
    factory = StoreFactory(redis_url)
    yield factory
    await factory.close()
