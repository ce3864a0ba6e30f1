"""The prompt's prefix chain (pure): the canonical prompt of chat and completions requests, the
chained block hashes, their cap, the correction an engine's cached-token count implies, and the
route receipt that shows them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from types import SimpleNamespace
from typing import cast

import orjson
import pytest

from gateway.common.config import ConfigError
from gateway.replica import proxy
from gateway.replica.app import Gateway
from gateway.replica.exchange import Exchange
from gateway.replica.prefix import PrefixChain, canonical_prompt, derive_chain, read_prompt
from gateway.replica.proxy import ProxyHandler
from gateway.replica.routing import Route
from gateway.replica.settings import load_settings
from shared_state import MAX_CHAIN_BLOCKS, Lease, Node

CHAT = "/v1/chat/completions"
SYSTEM = "You are a careful assistant. " * 40  # about 1.2 kB: several 256-byte blocks


def chat_body(messages: Sequence[object], **extra: object) -> bytes:
    return orjson.dumps({"model": "m", "messages": messages, **extra})


def chain_of(body: bytes, path: str = CHAT, block_bytes: int = 256) -> PrefixChain:
    read = read_prompt(body, path, block_bytes)
    assert read is not None
    return read[1]


def test_a_conversations_next_turn_extends_its_chain() -> None:
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "a" * 300}]
    turn2 = [*turn1, {"role": "assistant", "content": "b" * 500}, {"role": "user", "content": "c"}]
    one, two = chain_of(chat_body(turn1)), chain_of(chat_body(turn2))
    assert len(one.blocks) >= 5 and len(two.blocks) > len(one.blocks)
    assert two.blocks[: len(one.blocks)] == one.blocks
    assert len(set(two.blocks)) == len(two.blocks)
    assert all(len(b) == 16 and int(b, 16) >= 0 for b in two.blocks)


def test_same_prompt_same_chain_and_what_changes_it() -> None:
    messages = [{"role": "system", "content": SYSTEM}]
    base = chain_of(chat_body(messages))
    assert chain_of(chat_body(messages, stream=True, max_tokens=9)) == base  # not the prompt
    as_parts = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]
    assert chain_of(chat_body(as_parts)) == base
    other_role = [{"role": "user", "content": SYSTEM}]
    assert chain_of(chat_body(other_role)).blocks[0] != base.blocks[0]
    other_model = orjson.dumps({"model": "n", "messages": messages})
    assert chain_of(other_model).blocks[0] != base.blocks[0]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert chain_of(chat_body(messages, tools=tools)).blocks[0] != base.blocks[0]
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 400}}]
    with_image = [*messages, {"role": "user", "content": image}]
    assert chain_of(chat_body(with_image)).blocks[: len(base.blocks)] == base.blocks


def test_the_chain_is_blake2b_over_the_previous_digest() -> None:
    text = b"x" * 600
    chain = derive_chain("m", text, 256)
    digest = hashlib.blake2b(b"m", digest_size=8).digest()
    expected = []
    for start in (0, 256):
        digest = hashlib.blake2b(digest + text[start : start + 256], digest_size=8).digest()
        expected.append(digest.hex())
    assert chain == PrefixChain(tuple(expected), 600, 256)


def test_only_full_blocks_and_at_most_the_cap() -> None:
    assert derive_chain("m", b"y" * 255, 256).blocks == ()
    assert len(derive_chain("m", b"y" * 256, 256).blocks) == 1
    huge = b"z" * (256 * (MAX_CHAIN_BLOCKS + 10) + 7)
    chain = derive_chain("m", huge, 256)
    assert len(chain.blocks) == MAX_CHAIN_BLOCKS and chain.size == len(huge)


def test_completions_prompts() -> None:
    text = "q" * 1000
    as_text = chain_of(orjson.dumps({"model": "m", "prompt": text}), "/v1/completions")
    batch = chain_of(orjson.dumps({"model": "m", "prompt": [text, "other"]}), "/v1/completions")
    assert as_text == batch and len(as_text.blocks) == 3
    ids = orjson.dumps({"model": "m", "prompt": list(range(300))})
    assert len(chain_of(ids, "/v1/completions").blocks) >= 4
    nested = orjson.dumps({"model": "m", "prompt": [list(range(300))]})
    assert chain_of(nested, "/v1/completions") == chain_of(ids, "/v1/completions")


def test_embeddings_and_unreadable_bodies_have_no_chain() -> None:
    body = orjson.dumps({"model": "m", "input": "e" * 1000})
    assert chain_of(body, "/v1/embeddings").blocks == ()
    for bad in (b"{", b'{"model": "m", "messages": 3}', b'{"messages": []}', b"[]"):
        assert read_prompt(bad, CHAT, 256) is None


def test_canonical_prompt_of_tool_calls() -> None:
    read = read_prompt(
        chat_body([{"role": "assistant", "content": None, "tool_calls": [{"id": "t1"}]}]),
        CHAT,
        256,
    )
    assert read is not None and b'"t1"' in canonical_prompt(read[0])


@pytest.mark.parametrize(
    ("matched", "prompt_tokens", "cached_tokens", "forgotten_from"),
    [
        (8, 1000, 1000, None),  # all held, as predicted
        (8, 1000, 900, None),  # within a block of slack (the template's tokens)
        (8, 1000, 500, 6),  # held half (5 blocks, and one of slack): 6.. were not there
        (8, 1000, 0, 0),  # nothing held (a restarted engine)
        (0, 1000, 0, None),  # nothing predicted, nothing to correct
        (8, 0, 0, None),  # no usage counted
    ],
)
def test_feedback_forgets_what_the_engine_did_not_hold(
    matched: int, prompt_tokens: int, cached_tokens: int, forgotten_from: int | None
) -> None:
    chain = derive_chain("m", b"w" * (256 * 10), 256)
    forget = chain.forgotten(matched, prompt_tokens, cached_tokens)
    assert forget == (() if forgotten_from is None else chain.blocks[forgotten_from:])


def test_the_receipt_says_the_prefix_and_a_blind_fallback() -> None:
    node = Node(id="http://a:1", url="http://a:1", models=("m",))
    chain = derive_chain("m", b"v" * 1024, 256)
    shared = Route(node, Lease(node.id, "r:1"), False, 1, 2, 3.0, 7, "cache_aware", chain, 3)
    assert shared.receipt(1).endswith("state=shared; prefix=3/4 blocks")
    local = Route(node, Lease(node.id, "r:1"), True, 1, 2, 1.0, 7, "min_expected_latency", chain)
    assert local.receipt(1).endswith("state=local; prefix=blind/4 blocks")
    plain = Route(node, Lease(node.id, "r:1"), False, 1, 2, 1.0, 7, "least_connections")
    assert "prefix" not in plain.receipt(1)


def test_only_cache_aware_reads_the_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other strategies decode model, stream and user only: the prompt is never read."""

    def never(*_: object) -> None:
        raise AssertionError("the prompt was read")

    body = chat_body([{"role": "system", "content": SYSTEM}])
    exchange = cast(Exchange, SimpleNamespace(scope={"path": CHAT}, prefix=None))
    handler = ProxyHandler.__new__(ProxyHandler)  # only what _read_view needs
    handler.prefix_block_bytes = None
    with monkeypatch.context() as patch:
        patch.setattr(proxy, "read_prompt", never)
        assert handler._read_view(body, exchange).model == "m"
    assert exchange.prefix is None
    handler.prefix_block_bytes = 256
    assert handler._read_view(body, exchange).model == "m"
    assert exchange.prefix == chain_of(body)
    exchange.prefix = None
    assert handler._read_view(b'{"model": "m", "messages": 7}', exchange).model == "m"
    assert exchange.prefix is None  # not a prompt it reads: routed without a chain


def test_the_cache_unit_is_an_option_the_store_is_built_with() -> None:
    assert load_settings([], {}).prefix_cache_unit == "blocks"
    assert load_settings(["--prefix-cache-unit", "prompts"], {}).prefix_cache_unit == "prompts"
    env = {"FLEETGATE_PREFIX_CACHE_UNIT": " Prompts "}
    settings = load_settings([], env)
    assert settings.prefix_cache_unit == "prompts"
    with pytest.raises(ConfigError, match="blocks or prompts"):
        load_settings(["--prefix-cache-unit", "tokens"], {})
    assert Gateway(settings).store.settings.prefix.whole_prompts
    assert not Gateway(load_settings([], {})).store.settings.prefix.whole_prompts
