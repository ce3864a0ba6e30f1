"""Fixtures of the unit tests, which run inside the test process alone.

Every test here is sealed off (autouse): opening, binding or resolving a network address and
starting a child process raise :class:`OutsideTheProcess`, and a test that tried is failed at
teardown even if the code under test swallowed the error. A test that needs Redis, a server or
a process belongs in tests/e2e. The store here is the embedded one (fakeredis running the same
Lua scripts in-process); tests/e2e runs the same state tests against a real redis-server.
"""

from __future__ import annotations

import _posixsubprocess
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from typing import NoReturn

import pytest

from tests.support.store import StoreFactory


class OutsideTheProcess(Exception):
    """A unit test reached for the network or for a child process."""


# (owner, attribute, what calling it does): every way out of the process the tests could take.
EXITS: list[tuple[object, str, str]] = [
    (socket.socket, "connect", "connect a socket"),
    (socket.socket, "connect_ex", "connect a socket"),
    (socket.socket, "bind", "bind a socket"),
    (socket.socket, "sendto", "send a datagram"),
    (socket, "getaddrinfo", "resolve a network address"),
    (socket, "gethostbyname", "resolve a network address"),
    (subprocess.Popen, "_execute_child", "start a process"),
    (_posixsubprocess, "fork_exec", "start a process"),
    (os, "fork", "fork the process"),
    (os, "forkpty", "fork the process"),
    (os, "posix_spawn", "start a process"),
    (os, "posix_spawnp", "start a process"),
    (os, "system", "start a process"),
]


@pytest.fixture(scope="package", autouse=True)
def sealed() -> Iterator[list[str]]:
    """Every exit refused while the unit tests run (module fixtures included); yields the
    attempts made so far."""
    attempts: list[str] = []

    def refuse(what: str) -> Callable[..., NoReturn]:
        def refused(*args: object, **kwargs: object) -> NoReturn:
            shown = [a for a in args if not isinstance(a, socket.socket | subprocess.Popen)]
            detail = ", ".join(repr(a)[:80] for a in shown[:2])
            attempts.append(f"{what} ({detail})")
            raise OutsideTheProcess(f"a unit test may not {what} ({detail}): move it to tests/e2e")

        return refused

    with pytest.MonkeyPatch.context() as patch:
        for owner, name, what in EXITS:
            patch.setattr(owner, name, refuse(what))
        yield attempts


@pytest.fixture(autouse=True)
def stays_in_process(sealed: list[str]) -> Iterator[None]:
    """Fails the test that tried to leave the process, even if the error was caught."""
    sealed.clear()
    yield
    if sealed:
        pytest.fail(f"a unit test tried to leave its process: {'; '.join(sealed)}", pytrace=False)


@pytest.fixture(params=["embedded"])
async def store_factory() -> AsyncIterator[StoreFactory]:
    """Store clients on one in-process embedded store (the ``embedded`` id: tests/e2e runs the
    same tests on a real redis-server)."""
    factory = StoreFactory(None)
    yield factory
    await factory.close()
