"""Store clients for one test: several independent clients (one per simulated replica) on one
backend, a real Redis or the embedded store, all closed when the test ends."""

from __future__ import annotations

import random

from shared_state import Store, StoreSettings


class StoreFactory:
    """Makes Store clients on a real Redis at ``url``, or on the embedded store (``url`` None),
    where the clients of one test share the first one's in-process server."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.stores: list[Store] = []

    def __call__(self, settings: StoreSettings | None = None, seed: int = 1) -> Store:
        if self.url is not None:
            # A generous timeout: 400 concurrent calls on a busy CI machine are not an outage.
            store = Store.open(self.url, settings=settings, rng=random.Random(seed), timeout_s=5.0)
        elif self.stores:
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
