"""What the replica reads of a relayed stream's usage: the node's own token counts from its
usage event (vLLM and llama.cpp open a chat stream with a role-only event, so counting
events overcounts), found whichever chunk boundaries the node's writes made."""

from __future__ import annotations

import orjson

from gateway.replica.exchange import _stream_usage


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
