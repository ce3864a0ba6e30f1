"""Connecting the store: a URL that cannot name a store is refused with a typed error, before
any connection is tried (connecting for real: tests/e2e/test_connection.py)."""

from __future__ import annotations

import pytest

from shared_state import InvalidInput, Store


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379", "redis+sentinel://127.0.0.1:26379", "redis+sentinel://nohost/x"],
)
def test_bad_store_urls_are_typed_errors(url: str) -> None:
    with pytest.raises(InvalidInput):
        Store.open(url)
