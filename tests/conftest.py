"""What every test shares: the layout rule. A test module lives in tests/unit (in-process only,
which tests/unit/conftest.py enforces) or in tests/e2e (real Redis, processes and loopback
servers, with the fault-injection suite in tests/e2e/faults); the end-to-end tests carry the
``e2e`` marker, so ``-m "not e2e"`` leaves them out, and the fault tests ``faults``.

And the order the tests run in. The suite runs on two pytest-xdist workers (``-n 2`` in
pyproject.toml; ``-n 0`` runs it in one process), which are given whole modules, one at a
time, in this order: the tests of vLLM's server first (its worker waits for it to load while
the other runs the unit tests), then the unit tests and their rerun on a real Redis (in-process),
the other end-to-end tests, the other tests against real engines (which starved beside vLLM's
and once ran into their timeout), and last the fault tests and the Sentinel failover, whose leases
and timeouts are the tightest, so that they never share the machine with a loading vLLM. In
one process vLLM loads while the unit tests run (tests/e2e/engines/conftest.py), so its tests
come right after them."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent
FOLDERS = ("unit", "e2e")
VLLM = TESTS / "e2e" / "engines" / "test_vllm.py"
UNIT = TESTS / "unit"
ON_REDIS = TESTS / "e2e" / "test_state_on_redis.py"  # the unit tests' state tests, in-process
ENGINES = TESTS / "e2e" / "engines"  # llama-servers: not beside a vLLM at work
LATE = (TESTS / "e2e" / "faults", TESTS / "e2e" / "test_sentinel.py")
# The groups in the order they run: on workers vLLM's tests first, in one process after the
# in-process tests; the tests in no group (the other end-to-end ones) after them, then the
# other real-engine tests, then LATE.
ON_WORKERS = ((VLLM,), (UNIT,), (ON_REDIS,), (), (ENGINES,), LATE)
IN_ONE_PROCESS = ((UNIT,), (ON_REDIS,), (VLLM,), (), (ENGINES,), LATE)


def _rank(path: Path, order: tuple[tuple[Path, ...], ...]) -> int:
    """The group of ``order`` module ``path`` belongs to (see the module's docstring)."""
    for rank, group in enumerate(order):
        if any(path.is_relative_to(where) for where in group):
            return rank
    return order.index(())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: an end-to-end test (tests/e2e): real Redis, processes or loopback servers"
    )
    config.addinivalue_line(
        "markers",
        "faults: a fault-injection test (tests/e2e/faults): a dependency broken",
    )
    config.addinivalue_line(
        "markers",
        "exclusive: an end-to-end test that takes the machine's CPU: under xdist no other "
        "end-to-end test runs beside it (tests/e2e/conftest.py, machine_share)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misplaced: set[str] = set()
    for item in items:
        if not item.path.is_relative_to(TESTS):
            continue
        folder = item.path.relative_to(TESTS).parts[0]
        if folder == "e2e":
            item.add_marker(pytest.mark.e2e)
            if item.path.relative_to(TESTS).parts[1] == "faults":
                item.add_marker(pytest.mark.faults)
        elif folder not in FOLDERS:
            misplaced.add(item.path.relative_to(TESTS.parent).as_posix())
    if misplaced:
        raise pytest.UsageError(
            f"test modules belong in tests/unit or tests/e2e: {', '.join(sorted(misplaced))}"
        )
    order = ON_WORKERS if hasattr(config, "workerinput") else IN_ONE_PROCESS
    items.sort(key=lambda item: _rank(item.path, order))  # stable: each group in its order
