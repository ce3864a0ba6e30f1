"""What a node registration may carry: URLs every HTTP client of every process can reach, API keys
that cannot inject a header, model lists that are validated in linear time, and a
self-registration only of the caller's own address."""

from __future__ import annotations

import pytest

from gateway.replica.errors import Forbidden
from gateway.replica.nodes_api import check_own_address
from gateway.replica.upstream import origin_of
from shared_state import InvalidInput, normalize_url
from shared_state.registry import MAX_MODELS, validate_api_key, validate_models


@pytest.mark.parametrize(
    "url",
    [
        "http://\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com:8000",  # full-width: httpx refuses
        "http://exämple.com",
        "http://ex%41mple.com",
        "http://node:8000/v1\x00x",
        "http://node:8000/\x7fpath",
    ],
)
def test_urls_no_client_can_reach_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput):
        normalize_url(url)


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        ("http://Node-1.Local:8000/", "http://node-1.local:8000"),
        ("https://[::1]:443/v1", "https://[::1]:443/v1"),
        ("http://10.0.0.5:23333", "http://10.0.0.5:23333"),
        ("http://xn--exmple-cua.com", "http://xn--exmple-cua.com"),
    ],
)
def test_ascii_names_and_addresses_are_kept(url: str, canonical: str) -> None:
    assert normalize_url(url) == canonical


@pytest.mark.parametrize(
    "key", ["a\r\nx-injected: 1", "a\nb", "a\rb", "a b", "a\x00b", "\u043a\u043b\u044e\u0447"]
)
def test_a_key_that_would_break_a_header_is_refused(key: str) -> None:
    with pytest.raises(InvalidInput, match="api_key"):
        validate_api_key(key)


def test_ordinary_keys_pass() -> None:
    for key in ("", "sk-abc123", "Zm9vYmFy+/=", "a.b_c~d-e"):
        assert validate_api_key(key) == key


def test_a_stored_key_with_a_line_break_never_reaches_a_request() -> None:
    """A key written into the store directly skips registration: the upstream client refuses
    to send anything to that node rather than write the key into the request."""
    origin = origin_of("http://node:8000", api_key="k\r\n\r\nGET /admin HTTP/1.1")
    assert origin.refusal and origin.authorization == b""
    good = origin_of("http://node:8000", api_key="k-1")
    assert good.refusal == "" and good.authorization == b"\r\nauthorization: Bearer k-1"


def test_model_lists_are_deduplicated_in_order_and_bounded() -> None:
    assert validate_models(["b", "a", "b", "c", "a"]) == ("b", "a", "c")
    with pytest.raises(InvalidInput, match="at most"):
        validate_models(f"m{i}" for i in range(MAX_MODELS + 1))
    with pytest.raises(InvalidInput, match="characters"):
        validate_models(["x" * 10_000])


class CountedName(str):
    """A model name that counts how often it is compared for equality."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        CountedName.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_deduplicating_a_long_list_is_linear() -> None:
    """Counted, not timed: 4,000 names cost a few thousand comparisons at most; the quadratic
    deduplication (20k models stalled a replica for 3.3 s) made millions."""
    names = [CountedName(f"model-{i % 2000}") for i in range(4000)]
    CountedName.comparisons = 0
    assert len(validate_models(names)) == 2000
    assert CountedName.comparisons <= 2 * len(names)


@pytest.mark.parametrize(
    ("url", "caller"),
    [
        ("http://127.0.0.1:23333", "127.0.0.1"),
        ("http://10.0.0.5:23333", "::ffff:10.0.0.5"),  # a dual-stack listener's IPv4 caller
        ("http://[::1]:23333", "::1"),
    ],
)
async def test_a_node_registers_its_own_address(url: str, caller: str) -> None:
    await check_own_address(url, caller)


@pytest.mark.parametrize(
    ("url", "caller"),
    [
        ("http://127.0.0.2:23333", "127.0.0.1"),  # another address of the same machine
        ("http://10.0.0.6:6379", "10.0.0.5"),
        ("http://[::1]:23333", "127.0.0.1"),
        ("http://10.0.0.5:23333", None),
        ("http://10.0.0.5:23333", "not-an-address"),
    ],
)
async def test_a_node_never_registers_another_address(url: str, caller: str | None) -> None:
    with pytest.raises(Forbidden) as refused:
        await check_own_address(url, caller)
    assert refused.value.param == "url"
