"""The OpenAI API through two gateway replicas sharing Redis, in front of two real llama.cpp
``llama-server``s serving a tiny random model: models, chat and completions plain and streamed
with the ``openai`` SDK, usage and cached prompt tokens relayed as the engine wrote them, and
``fleetgate nodes add`` learning an engine's models.

Generation is greedy (temperature 0): the model's end-of-text row is zero, so an answer is
exactly ``max_tokens`` long, and both engines (same binary, same file, one thread each) give
the same text for the same prompt.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.engines.conftest import StartFleet
from tests.support.clients import async_sdk
from tests.support.engines import LlamaBuild, LlamaServer
from tests.support.processes import Gateway, Process, ops, together

pytestmark = pytest.mark.engines

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]
# About 1,400 tokens of the SentencePiece vocabulary: the shared prefix of the cache test.
LONG_PREFIX = " ".join(f"item{i}" for i in range(350))


async def test_models_chat_and_completions_plain_and_streamed(
    start_fleet: StartFleet, llama_build: LlamaBuild
) -> None:
    model = llama_build.name
    for gateway in start_fleet():
        sdk = async_sdk(gateway.url, timeout=60)
        assert [m.id for m in (await sdk.models.list()).data] == [model]

        chat = await sdk.chat.completions.create(
            model=model, messages=CHAT, max_tokens=8, temperature=0
        )
        text = chat.choices[0].message.content
        assert text and chat.choices[0].finish_reason == "length"
        assert chat.usage is not None and chat.usage.completion_tokens == 8

        stream = await sdk.chat.completions.create(
            model=model,
            messages=CHAT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(pieces) == text  # the same greedy answer, however it came
        assert chunks[0].choices[0].delta.role == "assistant"
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 8 and not chunks[-1].choices

        completion = await sdk.completions.create(
            model=model, prompt="Once upon a time", max_tokens=6, temperature=0
        )
        assert completion.choices[0].text and completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 6
        streamed = await sdk.completions.create(
            model=model, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
        )
        texts = [c.choices[0].text async for c in streamed if c.choices]
        assert "".join(texts) == completion.choices[0].text
        await sdk.close()


def _cached(engine: LlamaServer) -> float:
    return engine.metric("llamacpp:prompt_tokens_cached_total")


async def test_usage_and_cached_tokens_are_relayed_as_the_engine_wrote_them(
    start_fleet: StartFleet, engines: list[LlamaServer], llama_build: LlamaBuild
) -> None:
    # Session affinity keeps one conversation on one engine, where its prefix is cached.
    gateway = start_fleet("--strategy", "session_affinity")[0]
    by_url = {engine.url: engine for engine in engines}
    sdk = async_sdk(gateway.url, timeout=60)
    headers = {"X-Session-ID": "cached-prefix"}
    answers = []
    for question in ("What is the first item?", "What is the last item?"):
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": f"{LONG_PREFIX}\n{question}"}
        ]
        raw = await sdk.chat.completions.with_raw_response.create(
            model=llama_build.name,
            messages=messages,
            max_tokens=2,
            temperature=0,
            extra_headers=headers,
        )
        engine = by_url[raw.headers["x-fleetgate-node"]]
        answers.append((engine, raw.parse(), json.loads(raw.content)))
    (first_engine, first, _), (engine, second, body) = answers
    assert first_engine is engine
    assert first.usage is not None and second.usage is not None
    prompt = second.usage.prompt_tokens
    assert prompt > 1200
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    cached = details.cached_tokens
    assert 1200 < cached < prompt  # the shared prefix, not the differing question
    # Unchanged: llama.cpp's own fields ride along, and its counters agree with the client.
    timings: dict[str, Any] = body["timings"]
    assert timings["cache_n"] == cached and timings["prompt_n"] == prompt - cached
    assert _cached(engine) >= cached

    # Streamed, usage comes in the last chunk, cached tokens included.
    stream = await sdk.chat.completions.create(
        model=llama_build.name,
        messages=[{"role": "user", "content": f"{LONG_PREFIX}\nAnd the middle one?"}],
        max_tokens=2,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    )
    last = [chunk async for chunk in stream][-1]
    assert last.usage is not None and last.usage.prompt_tokens_details is not None
    assert (last.usage.prompt_tokens_details.cached_tokens or 0) > 1200
    await sdk.close()


async def test_nodes_add_learns_the_engines_models(
    redis_url: str, procs: list[Process], engines: list[LlamaServer], llama_build: LlamaBuild
) -> None:
    replicas = together(
        procs, [Gateway("--redis-url", redis_url, listening=False) for _ in range(2)]
    )
    for engine in engines:
        added = ops(redis_url, "nodes", "add", engine.url)  # models asked from the engine
        assert added.returncode == 0, added.stderr
        assert llama_build.name in added.stdout
    for replica in replicas:
        replica.wait_models(llama_build.name, timeout_s=10)
    listed = ops(redis_url, "nodes", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert sorted(row["url"] for row in rows) == sorted(e.url for e in engines)
    assert all(row["models"] == [llama_build.name] for row in rows)
    async with httpx.AsyncClient(timeout=60) as http:
        for replica in replicas:
            answer = await http.post(
                f"{replica.url}/v1/completions",
                json={"model": llama_build.name, "prompt": "Hi", "max_tokens": 1},
            )
            assert answer.status_code == 200, answer.text


async def test_the_rest_of_the_api_on_real_engines(
    start_fleet: StartFleet, llama_build: LlamaBuild
) -> None:
    """What llama-server serves besides chat, through both replicas: Anthropic's Messages API
    with the ``anthropic`` SDK (plain, streamed, count_tokens), OpenAI's Responses API (its id
    recorded, so a call by id goes to the engine that made it), tokenize and detokenize."""
    model = llama_build.name
    replicas = start_fleet("--strategy", "round_robin")
    for gateway in replicas:
        claude = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="none", max_retries=0)
        try:
            message = await claude.messages.create(
                model=model,
                max_tokens=6,
                messages=[{"role": "user", "content": "Say something."}],
                extra_body={"temperature": 0},
            )
            assert message.type == "message" and message.usage.output_tokens == 6
            async with claude.messages.stream(
                model=model,
                max_tokens=6,
                messages=[{"role": "user", "content": "Say something."}],
                extra_body={"temperature": 0},
            ) as stream:
                streamed = "".join([text async for text in stream.text_stream])
            texts = "".join(b.text for b in message.content if b.type == "text")
            assert streamed == texts  # greedy: the same answer however it came
            counted = await claude.messages.count_tokens(
                model=model, messages=[{"role": "user", "content": "Say something."}]
            )
            assert counted.input_tokens > 0
        finally:
            await claude.close()

        sdk = async_sdk(gateway.url, timeout=60)
        raw = await sdk.responses.with_raw_response.create(
            model=model, input="Say something.", max_output_tokens=4, temperature=0
        )
        answer = raw.parse()
        assert answer.id.startswith("resp_") and answer.output_text
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            asked = {"model": model, "content": "hello world"}
            tokens = (await http.post("/tokenize", json=asked)).json()
            text = await http.post("/detokenize", json={"model": model, **tokens})
            assert "hello world" in text.json()["content"]
            # By id: to the engine that made it (which keeps no responses: its own 404).
            by_id = await http.get(f"/v1/responses/{answer.id}")
            assert by_id.headers["x-fleetgate-node"] == raw.headers["x-fleetgate-node"]
        await sdk.close()
