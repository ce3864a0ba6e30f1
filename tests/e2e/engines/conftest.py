"""Fixtures of the tests against real engines: llama.cpp's ``llama-server`` built at its pinned
version with a tiny random model (both from the cache outside the repository, made there first
if missing), two such engines on free loopback ports, and gateway replicas sharing the
session's real Redis in front of them, with a health-checker.

The engine is prepared once, when collection is over and before any test runs (only if a
selected test asks for it), so that a build of several minutes counts against no test's
timeout. If it cannot be prepared here (no compiler, no network), every test that needs it
fails with that reason: a missing engine never turns into a silent skip. ``-m "not engines"``
leaves these tests out, and then nothing is built.

vLLM's server, which takes 40 s or more to load, is started then too (only if a selected test
asks for it) and loads while the unit tests run (the order of the tests is tests/conftest.py's).
Under pytest-xdist it is started by the worker that runs its tests instead, when their module
begins (the first module given out), while the other worker runs the unit tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from scripts.engine.cache import EngineUnavailable
from tests.support.engines import LlamaBuild, LlamaServer, VllmServer, VllmStart, prepare
from tests.support.processes import Checker, Gateway, Process, together

_prepared: list[LlamaBuild | EngineUnavailable] = []
_vllm: list[VllmStart] = []


def _wants(item: pytest.Item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def pytest_collection_finish(session: pytest.Session) -> None:
    start_vllm = not _vllm and any(_wants(item, "vllm_server") for item in session.items)
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        start_vllm = False
    build = not _prepared and any(_wants(item, "llama_build") for item in session.items)
    if not (start_vllm or build):
        return
    # Uncaptured: a first build takes minutes, and its progress lines say why nothing moves.
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if start_vllm:
            _vllm.append(VllmStart())
            session.config.add_cleanup(_vllm[0].close)
        if build:
            try:
                _prepared.append(prepare())
            except EngineUnavailable as exc:
                _prepared.append(exc)


@pytest.fixture(scope="session")
def llama_build() -> LlamaBuild:
    """The prepared ``llama-server`` and model; a failure (not a skip) if there is none."""
    if not _prepared:  # collected in an unusual way: prepare now
        try:
            _prepared.append(prepare())
        except EngineUnavailable as exc:
            _prepared.append(exc)
    found = _prepared[0]
    if isinstance(found, EngineUnavailable):
        pytest.fail(f"llama-server is not available here: {found}", pytrace=False)
    return found


StartEngine = Callable[..., LlamaServer]


@pytest.fixture
def start_engine(llama_build: LlamaBuild, procs: list[Process]) -> StartEngine:
    """Start a ``llama-server`` (keywords as :class:`LlamaServer`'s), ready to serve."""

    def start(**kwargs: int) -> LlamaServer:
        engine = LlamaServer(llama_build, **kwargs)
        procs.append(engine)
        return engine.wait_ready()

    return start


@pytest.fixture
def engines(llama_build: LlamaBuild, procs: list[Process]) -> list[LlamaServer]:
    """Two engines, started together, ready."""
    started = [LlamaServer(llama_build), LlamaServer(llama_build)]
    procs.extend(started)
    return [engine.wait_ready() for engine in started]


StartFleet = Callable[..., list[Gateway]]


@pytest.fixture
def start_fleet(
    redis_url: str, procs: list[Process], engines: list[LlamaServer], llama_build: LlamaBuild
) -> StartFleet:
    """Two gateway replicas sharing the session's Redis, each started with ``--node`` for both
    engines and the given extra flags, and listing the engines' model."""

    def start(*flags: str) -> list[Gateway]:
        nodes = [arg for engine in engines for arg in ("--node", engine.url)]
        replicas = [
            Gateway("--redis-url", redis_url, *nodes, *flags, listening=False) for _ in range(2)
        ]
        for replica in together(procs, replicas):
            replica.wait_models(llama_build.name, timeout_s=20)
        return replicas

    return start


@pytest.fixture
def start_checker(redis_url: str, procs: list[Process]) -> Callable[..., Checker]:
    """A health-checker on the session's Redis with fast rounds (``flags`` add to them)."""

    def start(*flags: str) -> Checker:
        checker = Checker(redis_url, "engines", "--fall", "2", "--rise", "2", *flags)
        procs.append(checker)
        return checker

    return start


@pytest.fixture(scope="module")
def vllm_server() -> Iterator[VllmServer]:
    """The vLLM server started after collection, once it is ready (started now if it was
    not); a failure, not a skip, if there is none. Stopped at the end of the module."""
    if not _vllm:  # collected in an unusual way: start now
        _vllm.append(VllmStart())
    start = _vllm[0]
    try:
        server = start.ready()
    except RuntimeError as exc:
        start.close()
        pytest.fail(str(exc), pytrace=False)
    yield server
    start.close()
