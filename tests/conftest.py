"""Fixtures: a real redis-server for the session, and a store on it or on the embedded store."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from shared_state import Store, StoreSettings
from tests.fleet import Process
from tests.support import RedisServer


@pytest.fixture
def procs() -> Iterator[list[Process]]:
    """Processes a test starts; all stopped when it ends, last started first."""
    started: list[Process] = []
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


@pytest.fixture(params=["redis", "embedded"])
def backend(request: pytest.FixtureRequest) -> str:
    """Runs a test once against a real redis-server and once against the embedded store."""
    return str(request.param)


@pytest.fixture
async def store_factory(backend: str, redis_server: RedisServer) -> AsyncIterator[StoreFactory]:
    factory = StoreFactory(backend, redis_server)
    await factory.flush()
    yield factory
    await factory.close()


class StoreFactory:
    """Makes independent Store clients (one per simulated replica) on one backend."""

    def __init__(self, backend: str, server: RedisServer) -> None:
        self.backend = backend
        self.server = server
        self.stores: list[Store] = []

    async def flush(self) -> None:
        if self.backend == "redis":
            client = aioredis.Redis.from_url(self.server.url)
            await client.flushall()
            await client.aclose()

    def __call__(self, settings: StoreSettings | None = None, seed: int = 1) -> Store:
        if self.backend == "redis":
            # A generous timeout: 400 concurrent calls on a busy CI machine are not an outage.
            store = Store.open(
                self.server.url, settings=settings, rng=random.Random(seed), timeout_s=5.0
            )
        elif self.stores:
            # Embedded: the replicas of one test share the first store's in-process server.
            first = self.stores[0]
            store = Store(first.client, settings=settings, rng=random.Random(seed), embedded=True)
        else:
            store = Store.open(None, settings=settings, rng=random.Random(seed))
        self.stores.append(store)
        return store

    async def close(self) -> None:
        closed: set[int] = set()
        for store in self.stores:
            if id(store.client) not in closed:
                closed.add(id(store.client))
                await store.close()
