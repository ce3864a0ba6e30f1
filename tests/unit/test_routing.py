"""Pure routing logic of one replica: the retry budget and the local fallback picker."""

from __future__ import annotations

import random

from gateway.replica.metrics import GatewayMetrics
from gateway.replica.routing import RetryBudget, Router
from shared_state import Node, Registry, RegistryView, Store, Strategy


def test_retry_budget_has_a_floor_then_follows_the_request_ratio() -> None:
    budget = RetryBudget(ratio=0.2, floor=3, cap=10)
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]
    for _ in range(10):  # ten requests earn two retries
        budget.on_request()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    for _ in range(1000):
        budget.on_request()
    assert sum(budget.try_spend() for _ in range(50)) == 10  # capped


class _CachedOnly(Store):
    """Only what the local picker reads: the cached view (no Redis involved, so the store's own
    set-up is skipped)."""

    def __init__(self, view: RegistryView) -> None:
        self._cached = view

    @property
    def cached_view(self) -> RegistryView | None:
        return self._cached


def test_local_fallback_balances_on_own_counts_weighted_by_speed() -> None:
    nodes = (
        Node(id="http://a:1", url="http://a:1", models=("m",), speed=3.0),
        Node(id="http://b:1", url="http://b:1", models=("m",), speed=1.0),
        Node(id="http://c:1", url="http://c:1", models=("other",)),
    )
    view = RegistryView(Registry(1, nodes))
    router = Router(
        _CachedOnly(view),
        "r1",
        Strategy.MIN_EXPECTED_LATENCY,
        GatewayMetrics(),
        random.Random(1),
    )
    routes = [router._local_pick("m", str(i), [], 0) for i in range(8)]
    counts = {
        n: sum(1 for r in routes if r and r.node.id == n) for n in ("http://a:1", "http://b:1")
    }
    assert counts == {"http://a:1": 6, "http://b:1": 2}  # in-flight per unit of speed
    assert all(r is not None and r.local for r in routes)
    assert router._local_pick("nope", "x", [], 0) is None
    assert router._local_pick("m", "y", ["http://a:1", "http://b:1"], 0) is None
