"""The shared state's unit tests run again against a real redis-server: the same test classes
as in tests/unit (whose store is the embedded one), given Redis clients by this folder's
``store_factory``, so the Lua scripts are checked in Redis itself and under real concurrency."""

from __future__ import annotations

from tests.unit import (
    test_admission,
    test_admission_settings,
    test_health,
    test_limits,
    test_pd_state,
    test_prefix_index,
    test_registry_restore,
    test_responses_state,
    test_store,
)

# -- the store: tests/unit/test_store.py ----------------------------------------------------


class TestRegistry(test_store.TestRegistry):
    """Registering, updating, draining and removing nodes, on Redis."""


class TestStrategies(test_store.TestStrategies):
    """Every routing strategy, on Redis."""


class TestFiltering(test_store.TestFiltering):
    """Picks filtered by model, role and state, on Redis."""


class TestLeases(test_store.TestLeases):
    """Leases taken, renewed, expired and raced for, on Redis."""


class TestEjection(test_store.TestEjection):
    """Ejection of failing nodes, on Redis."""


class TestWeightedAndAffinity(test_store.TestWeightedAndAffinity):
    """Weighted strategies and session affinity, on Redis."""


class TestKeyStore(test_store.TestKeyStore):
    """The API key store, on Redis."""


# -- the fleet's queue: tests/unit/test_admission.py ----------------------------------------


class TestCapacity(test_admission.TestCapacity):
    """Node capacity in picks, on Redis."""


class TestQueue(test_admission.TestQueue):
    """The fleet's queue: order, fair shares, expiry and races, on Redis."""


class TestReserve(test_admission.TestReserve):
    """Slots kept for high priority, on Redis."""


class TestNodeCapacity(test_admission_settings.TestNodeCapacity):
    """Node capacity in the registry, on Redis."""


class TestKeyAdmission(test_admission_settings.TestKeyAdmission):
    """Client keys' priorities and shares, on Redis."""


class TestResponseMap(test_responses_state.TestResponseMap):
    """The stored-response map, on Redis."""


# -- the health ledger: tests/unit/test_health.py -------------------------------------------


class TestLedger(test_health.TestLedger):
    """The health-checker's ledger, on Redis."""


# -- the DistServe state: tests/unit/test_pd_state.py ---------------------------------------


class TestSessions(test_pd_state.TestSessions):
    """PD sessions, on Redis."""


class TestPairs(test_pd_state.TestPairs):
    """PD pairs and their connect lock, on Redis."""


# -- per-key limits: tests/unit/test_limits.py ----------------------------------------------


class TestStoredLimits(test_limits.TestStoredLimits):
    """Limits stored with the key, on Redis."""


class TestRateLimit(test_limits.TestRateLimit):
    """Requests per minute, on Redis."""


class TestConcurrency(test_limits.TestConcurrency):
    """Concurrency slots, on Redis."""


class TestGatewayCheck(test_limits.TestGatewayCheck):
    """A replica's check of a key's limits, on Redis."""


class TestRegistryRestore(test_registry_restore.TestRegistryRestore):
    """A store that lost the registry, restored once, on Redis."""


# -- the prefix index: tests/unit/test_prefix_index.py --------------------------------------


class TestCacheAwarePick(test_prefix_index.TestCacheAwarePick):
    """The cache_aware pick, recording and eviction, on Redis."""


class TestWholePrompts(test_prefix_index.TestWholePrompts):
    """Caches of whole prompts (llama-server's), on Redis."""


class TestIndexStaysTrue(test_prefix_index.TestIndexStaysTrue):
    """Blocks forgotten at release and dropped with their node, on Redis."""
