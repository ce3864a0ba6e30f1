"""What the replica reads of a relayed stream's usage: the node's own token counts from its
usage event (vLLM and llama.cpp open a chat stream with a role-only event, so counting
events overcounts), found whichever chunk boundaries the node's writes made; without one, the
events that carried text, whatever the engine's stream looks like around them."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gateway.replica.exchange import _stream_usage, _token_texts
from gateway.sim import flavors
from gateway.sim.flavors import FLAVORS

DATA = Path(__file__).parent / "data"


def event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def vllm_chat_stream(tokens: int, cached: int) -> list[bytes]:
    """A vLLM chat stream with include_usage: a role-only event, one per token (the last
    carrying finish_reason, every one a null usage), the usage event, [DONE]."""
    chunk = {"object": "chat.completion.chunk", "usage": None}
    events = [event({**chunk, "choices": [{"delta": {"role": "assistant", "content": ""}}]})]
    for i in range(tokens):
        finish = "length" if i == tokens - 1 else None
        delta = {"delta": {"content": f"t{i}"}, "finish_reason": finish}
        events.append(event({**chunk, "choices": [delta]}))
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": tokens,
        "total_tokens": 1200 + tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    events.append(event({**chunk, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


def test_the_usage_event_gives_the_tokens_and_the_cached_prompt() -> None:
    stream = b"".join(vllm_chat_stream(7, 1024))
    usage = _stream_usage(stream)
    assert usage is not None
    assert usage.completion_tokens == 7
    assert usage.cached() == (1200, 1024)


def test_a_usage_event_split_over_two_chunks_is_found() -> None:
    whole = b"".join(vllm_chat_stream(3, 0)[-2:])
    cut = whole.index(b'"usage"') + 3
    assert _stream_usage(whole[:cut] + whole[cut:]) is not None
    assert _stream_usage(whole[cut:]) is None  # its start is needed: the relay keeps it


def test_null_usages_and_a_stream_without_usage_give_none() -> None:
    events = vllm_chat_stream(4, 0)
    assert _stream_usage(b"".join(events[:-2] + events[-1:])) is None
    assert _stream_usage(b"data: [DONE]\n\n") is None


@pytest.mark.parametrize(
    "sample",
    ["vllm_chat_stream.txt", "vllm_chat_stream_usage.txt", "vllm_completion_stream_usage.txt"],
)
def test_a_stream_without_usage_counts_its_texts_not_its_events(sample: str) -> None:
    """vLLM's streams (saved from the real server: three tokens each) open a chat with a
    role-only chunk and finish on the last token's chunk, where the simulator's and OpenAI's
    add an empty finishing chunk: counting events was one off either way."""
    assert _token_texts((DATA / sample).read_bytes()) == 3


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("kind", ["chat", "text"])
def test_every_simulated_flavors_stream_counts_its_tokens(flavor: str, kind: str) -> None:
    shape, chat = flavors.of(flavor), kind == "chat"
    head = {"id": "x", "object": "chunk", "created": 0, "model": "m"}
    stream = [
        *shape.opening(chat, head),
        *(shape.token(chat, head, i, f"tok{i} ", i == 4, False) for i in range(5)),
        *shape.closing(chat, head, lambda: {"prompt_tokens": 1, "completion_tokens": 5}, False),
    ]
    assert _token_texts(b"".join(event(e) for e in stream) + b"data: [DONE]\n\n") == 5
