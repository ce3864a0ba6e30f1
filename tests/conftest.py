"""What every test shares: the layout rule. A test module lives in tests/unit (in-process only,
which tests/unit/conftest.py enforces) or in tests/e2e (real Redis, processes and loopback
servers, with the fault-injection suite in tests/e2e/faults); the end-to-end tests carry the
``e2e`` marker, so ``-m "not e2e"`` leaves them out, and the fault tests ``faults``."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent
FOLDERS = ("unit", "e2e")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: an end-to-end test (tests/e2e): real Redis, processes or loopback servers"
    )
    config.addinivalue_line(
        "markers",
        "faults: a fault-injection test (tests/e2e/faults): a dependency broken",
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
