"""The simulated node's further APIs (gateway/sim/apis.py) served for real on a loopback port and
called through the official SDKs, as the gateway's tests call them: OpenAI's Responses API with
its per-node state, Anthropic's Messages API, audio; and over plain HTTP rerank, score and vLLM's
tokenizer; the faults they meet and what /sim/stats counts of them."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from gateway.sim.node import NODE_KEY, SimConfig, SimNode, build_app
from tests.support import MODEL
from tests.support.openai_errors import assert_openai_error

Start = Callable[..., Awaitable[tuple[str, SimNode]]]
USER = [{"role": "user", "content": "say hello"}]


@pytest.fixture
async def start_node() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> tuple[str, SimNode]:
        config = SimConfig(**{"port": 0, "tokens_per_s": 0.0, **overrides})
        app = build_app(config)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}", app[NODE_KEY]

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def oai(base: str, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=10)


def claude(base: str, key: str = "sk-ant-test") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0, timeout=10)


async def stats(http: httpx.AsyncClient, base: str) -> dict[str, Any]:
    result: dict[str, Any] = (await http.get(f"{base}/sim/stats")).json()
    return result


async def set_fault(http: httpx.AsyncClient, base: str, **body: Any) -> None:
    assert (await http.post(f"{base}/sim/fault", json=body)).status_code == 200


def events_of(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The named server-sent events of a stream: (event, data), each data's type its name."""
    found = []
    for block in text.split("\n\n")[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        parsed = httpx.Response(200, content=data.removeprefix("data: ")).json()
        assert parsed["type"] == name.removeprefix("event: ")
        found.append((parsed["type"], parsed))
    return found


# --- the Responses API -------------------------------------------------------------------
async def test_responses_chain_on_the_node_that_holds_it(
    start_node: Start, http: httpx.AsyncClient
) -> None:
    base, _ = await start_node()
    other, _ = await start_node()
    async with oai(base) as sdk, oai(other) as elsewhere:
        first = await sdk.responses.create(model=MODEL, input="say hello", max_output_tokens=4)
        assert first.id.startswith("resp_") and first.object == "response"
        assert (first.status, first.output_text) == ("completed", "tok0 tok1 tok2 tok3 ")
        assert first.usage is not None
        assert (first.usage.input_tokens, first.usage.output_tokens) == (2, 4)
        assert first.usage.total_tokens == 6
        # Continued: the whole conversation is its input (2 + 4 words), then 3 more.
        second = await sdk.responses.create(
            model=MODEL,
            input=[
                {"role": "user", "content": "say hello"},
                {"role": "user", "content": "once more"},
            ],
            previous_response_id=first.id,
            max_output_tokens=2,
        )
        assert second.previous_response_id == first.id and second.output_text == "tok0 tok1 "
        assert second.usage is not None and second.usage.input_tokens == 2 + 4 + 4
        fresh = await sdk.responses.create(model=MODEL, input="say hello", max_output_tokens=2)
        assert fresh.usage is not None and fresh.usage.input_tokens == 2
        assert (await sdk.responses.retrieve(second.id)).output_text == "tok0 tok1 "
        items = [i async for i in sdk.responses.input_items.list(second.id, order="asc", limit=2)]
        assert [getattr(i, "role", None) for i in items] == ["user", "assistant", "user", "user"]
        assert items[1].id == first.output[0].id and len({i.id for i in items}) == 4
        newest = await sdk.responses.input_items.list(second.id)  # desc by default
        assert [i.id for i in newest.data] == [i.id for i in reversed(items)]
        # Unknown on any other node: a chain must go back to the node that holds it.
        with pytest.raises(openai.NotFoundError):
            await elsewhere.responses.retrieve(second.id)
        with pytest.raises(openai.NotFoundError) as missing:
            await elsewhere.responses.create(
                model=MODEL, input="hi", previous_response_id=second.id
            )
        assert missing.value.body == {
            "message": f"Response with id '{second.id}' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }
        await sdk.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(first.id)
        unstored = await sdk.responses.create(model=MODEL, input="x", store=False)
        assert unstored.output_text == "".join(f"tok{i} " for i in range(16))
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(unstored.id)
    found = assert_openai_error(await http.delete(f"{base}/v1/responses/{first.id}"), 404)
    assert found["param"] == "response_id"
    current = await stats(http, base)
    assert current["paths"]["/v1/responses"] == 4
    assert current["paths"][f"/v1/responses/{second.id}"] == 1
    assert current["paths"][f"/v1/responses/{second.id}/input_items"] == 3
    assert current["responses_stored"] == 2 and current["served"] == 4
    assert current["last_headers"]["/v1/responses"]["authorization"] == "Bearer sk-test"
    assert (await stats(http, other))["paths"]["/v1/responses"] == 1


async def test_responses_stream_typed_events(start_node: Start, http: httpx.AsyncClient) -> None:
    base, _ = await start_node(tokens_per_s=100.0)
    async with oai(base) as sdk:
        began = time.monotonic()
        stream = await sdk.responses.create(
            model=MODEL, input="say hello", max_output_tokens=10, stream=True
        )
        events = [event async for event in stream]
        assert time.monotonic() - began >= 0.09  # ten tokens at the node's pace
        kinds = [e.type for e in events]
        assert kinds == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            *["response.output_text.delta"] * 10,
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        done = events[-1]
        assert done.type == "response.completed"
        assert done.response.output_text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 tok9 "
        assert done.response.usage is not None and done.response.usage.output_tokens == 10
        assert (await sdk.responses.retrieve(done.response.id)).status == "completed"
        async with sdk.responses.stream(model=MODEL, input="hi", max_output_tokens=3) as helper:
            final = await helper.get_final_response()
        assert final.output_text == "tok0 tok1 tok2 "
    raw = await http.post(
        f"{base}/v1/responses",
        json={"model": MODEL, "input": "x", "max_output_tokens": 2, "stream": True},
    )
    assert raw.headers["content-type"] == "text/event-stream"
    named = events_of(raw.text)
    assert [d["sequence_number"] for _, d in named] == list(range(10))
    assert [d["delta"] for k, d in named if k == "response.output_text.delta"] == ["tok0 ", "tok1 "]


async def test_responses_faults(start_node: Start, http: httpx.AsyncClient) -> None:
    base, _ = await start_node(tokens_per_s=1000.0)
    async with oai(base) as sdk:
        await set_fault(http, base, mode="status_503", count=1)
        with pytest.raises(openai.InternalServerError) as refused:
            await sdk.responses.create(model=MODEL, input="hi")
        assert refused.value.status_code == 503
        await set_fault(http, base, mode="reset", count=1)
        with pytest.raises(openai.APIConnectionError):
            await sdk.responses.create(model=MODEL, input="hi")
        await set_fault(http, base, mode="die_mid_stream")
        stream = await sdk.responses.create(
            model=MODEL, input="hi", max_output_tokens=10, stream=True
        )
        seen: list[Any] = []
        with pytest.raises(openai.APIConnectionError):
            async for event in stream:
                seen.append(event)
        deltas = [e for e in seen if e.type == "response.output_text.delta"]
        assert len(deltas) == 3  # the default cut
        cut = await sdk.responses.retrieve(seen[0].response.id)
        assert cut.status == "failed" and cut.error is not None
        await set_fault(http, base, mode="none")
    current = await stats(http, base)
    assert (current["running"], current["served"], current["requests_total"]) == (0, 0, 3)


async def test_responses_background_and_cancel(start_node: Start, http: httpx.AsyncClient) -> None:
    base, _ = await start_node(tokens_per_s=50.0)
    async with oai(base) as sdk:
        long = await sdk.responses.create(
            model=MODEL, input="hi", max_output_tokens=500, background=True
        )
        assert long.status == "queued" and long.background is True
        assert (await sdk.responses.retrieve(long.id)).status == "in_progress"
        cancelled = await sdk.responses.cancel(long.id)
        assert cancelled.status == "cancelled"
        assert (await sdk.responses.retrieve(long.id)).status == "cancelled"
        with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
            await sdk.responses.cancel(long.id)
        short = await sdk.responses.create(
            model=MODEL, input="hi", max_output_tokens=2, background=True
        )
        for _ in range(200):
            if (polled := await sdk.responses.retrieve(short.id)).status == "completed":
                break
            await asyncio.sleep(0.01)
        assert polled.output_text == "tok0 tok1 "
        foreground = await sdk.responses.create(model=MODEL, input="hi", max_output_tokens=1)
        with pytest.raises(openai.BadRequestError):
            await sdk.responses.cancel(foreground.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.cancel("resp_unknown")
    # A response in flight is retrieved in progress, and takes a batch slot meanwhile.
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 60, "stream": True}
    async with http.stream("POST", f"{base}/v1/responses", json=body) as resp:
        lines = resp.aiter_lines()
        async for line in lines:
            if line.startswith("data: ") and "response.created" in line:
                rid = httpx.Response(200, content=line[6:]).json()["response"]["id"]
                break
        assert (await stats(http, base))["running"] == 1
        in_flight = (await http.get(f"{base}/v1/responses/{rid}")).json()
        assert in_flight["status"] == "in_progress"
        rest = [line async for line in lines]
        assert "event: response.completed" in rest
    assert (await http.get(f"{base}/v1/responses/{rid}")).json()["status"] == "completed"


async def test_responses_requests_refused(start_node: Start, http: httpx.AsyncClient) -> None:
    base, _ = await start_node()
    url = f"{base}/v1/responses"
    assert_openai_error(await http.post(url, json={"model": MODEL}), 400)
    assert_openai_error(await http.post(url, json={"model": MODEL, "input": 3}), 400)
    bad = {"model": MODEL, "input": "x", "max_output_tokens": -1}
    assert assert_openai_error(await http.post(url, json=bad), 400)["param"] == "max_output_tokens"
    assert_openai_error(await http.post(url, json={"model": "nope", "input": "x"}), 404)
    vllm, _ = await start_node(flavor="vllm")
    body = {"input": "x", "previous_response_id": "resp_gone"}  # vLLM: its model by default
    answer = await http.post(f"{vllm}/v1/responses", json=body)
    error = assert_openai_error(answer, 404)
    assert (error["type"], error["code"]) == ("invalid_request_error", 404)
    keyed, _ = await start_node(api_key="secret")
    assert (
        await http.post(f"{keyed}/v1/responses", json={"model": MODEL, "input": "x"})
    ).status_code == 401


# --- Anthropic's Messages API ----------------------------------------------------------------
async def test_messages_whole_and_streamed(start_node: Start, http: httpx.AsyncClient) -> None:
    base, _ = await start_node(tokens_per_s=200.0)
    async with claude(base) as sdk:
        message = await sdk.messages.create(
            model=MODEL,
            max_tokens=5,
            system="be brief",
            messages=[{"role": "user", "content": "say hello"}],
        )
        assert message.id.startswith("msg_") and message.type == "message"
        assert message.content[0].type == "text"
        assert message.content[0].text == "tok0 tok1 tok2 tok3 tok4 "
        assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
        assert (message.usage.input_tokens, message.usage.output_tokens) == (4, 5)
        stopped = await sdk.messages.create(
            model=MODEL,
            max_tokens=9,
            stop_sequences=["tok3"],
            messages=[{"role": "user", "content": "x"}],
        )
        assert stopped.content[0].type == "text" and stopped.content[0].text == "tok0 tok1 tok2 "
        assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "tok3")
        async with sdk.messages.stream(
            model=MODEL, max_tokens=6, messages=[{"role": "user", "content": "say hello"}]
        ) as stream:
            texts = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        assert texts == [f"tok{i} " for i in range(6)]
        assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == (
            "max_tokens",
            2,
            6,
        )
        counted = await sdk.messages.count_tokens(
            model=MODEL, system="be brief", messages=[{"role": "user", "content": "one two three"}]
        )
        assert counted.input_tokens == 5
    raw = await http.post(
        f"{base}/v1/messages",
        json={"model": MODEL, "max_tokens": 2, "stream": True, "messages": USER},
        headers={"anthropic-version": "2023-06-01", "x-api-key": "raw-key"},
    )
    assert raw.headers["request-id"].startswith("req_")
    assert [k for k, _ in events_of(raw.text)] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    current = await stats(http, base)
    assert (
        current["paths"]["/v1/messages"] == 4 and current["paths"]["/v1/messages/count_tokens"] == 1
    )
    # The SDK's key, as a bearer token or in x-api-key (SDKs differ), and its API version.
    seen = current["last_headers"]["/v1/messages/count_tokens"]
    assert seen.get("x-api-key") == "sk-ant-test" or seen["authorization"] == "Bearer sk-ant-test"
    assert seen["anthropic-version"]
    assert current["last_headers"]["/v1/messages"] == {
        "x-api-key": "raw-key",
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
    }
    assert (current["served"], current["running"]) == (4, 0)


async def test_messages_errors_in_anthropic_shape(
    start_node: Start, http: httpx.AsyncClient
) -> None:
    base, _ = await start_node(api_key="secret")
    async with claude(base, key="wrong") as sdk:
        with pytest.raises(anthropic.AuthenticationError):
            await sdk.messages.create(
                model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "x"}]
            )
    async with claude(base, key="secret") as sdk:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await sdk.messages.create(
                model="nope", max_tokens=1, messages=[{"role": "user", "content": "x"}]
            )
        assert missing.value.body == {
            "type": "error",
            "error": {"type": "not_found_error", "message": "model: nope"},
        }
        await set_fault(http, base, mode="status_503", count=1)
        with pytest.raises(anthropic.InternalServerError) as refused:
            await sdk.messages.create(
                model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "x"}]
            )
        assert refused.value.status_code == 503
        assert refused.value.body == {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "simulated fault: status_503"},
        }
    key = {"x-api-key": "secret"}
    await set_fault(http, base, mode="die_mid_stream")
    body = {"model": MODEL, "max_tokens": 9, "stream": True, "messages": USER}
    lines: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):  # the chunked body never ends
        async with http.stream("POST", f"{base}/v1/messages", json=body, headers=key) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                lines.append(line)
    assert lines.count("event: content_block_delta") == 3 and "event: message_stop" not in lines
    await set_fault(http, base, mode="none")
    answer = await http.post(f"{base}/v1/messages", json={**body, "stream": False}, headers=key)
    assert answer.status_code == 200 and answer.json()["usage"]["output_tokens"] == 9
    bearer = {"Authorization": "Bearer secret"}
    invalid: list[tuple[dict[str, Any], str]] = [
        ({"model": MODEL, "messages": USER}, "max_tokens: Field required"),
        (
            {"model": MODEL, "max_tokens": 1, "messages": []},
            "messages: at least one message is required",
        ),
    ]
    for wrong, wanted in invalid:
        answer = await http.post(f"{base}/v1/messages", json=wrong, headers=bearer)
        assert answer.status_code == 400
        assert answer.json() == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": wanted},
        }


# --- rerank, score, audio, tokenizer -----------------------------------------------------
async def test_rerank_and_score(start_node: Start, http: httpx.AsyncClient) -> None:
    base, _ = await start_node()
    documents = ["the cat sat", "a dog ran", "the cat and the dog"]
    body = {"model": MODEL, "query": "the cat", "documents": documents}
    for path in ("/rerank", "/v1/rerank"):
        answer = (await http.post(f"{base}{path}", json=body)).json()
        assert answer["model"] == MODEL and answer["id"].startswith("rerank-")
        assert [r["index"] for r in answer["results"]] == [0, 2, 1]
        assert answer["results"][0] == {
            "index": 0,
            "document": {"text": "the cat sat"},
            "relevance_score": 0.666667,
        }
        assert answer["results"][2]["relevance_score"] == 0.0
        assert answer["usage"] == {"total_tokens": 2 * 3 + 3 + 3 + 5}
    top = (await http.post(f"{base}/v1/rerank", json={**body, "top_n": 1})).json()
    assert [r["index"] for r in top["results"]] == [0]
    assert_openai_error(await http.post(f"{base}/v1/rerank", json={"query": "x"}), 400)
    scored = (
        await http.post(
            f"{base}/v1/score", json={"model": MODEL, "text_1": "the cat", "text_2": documents}
        )
    ).json()
    assert scored["object"] == "list" and scored["model"] == MODEL
    assert scored["data"] == [
        {"index": 0, "object": "score", "score": 0.666667},
        {"index": 1, "object": "score", "score": 0.0},
        {"index": 2, "object": "score", "score": 0.5},
    ]
    assert scored["usage"]["prompt_tokens"] == 2 * 3 + 11
    pair = (await http.post(f"{base}/v1/score", json={"text_1": ["a b"], "text_2": "b c"})).json()
    assert pair["data"][0]["score"] == 0.333333 and pair["model"] == MODEL
    await set_fault(http, base, mode="fail", count=1)
    assert_openai_error(await http.post(f"{base}/rerank", json=body), 500)
    current = await stats(http, base)
    assert current["paths"] == {"/rerank": 2, "/v1/rerank": 3, "/v1/score": 2}


async def test_audio_transcriptions_and_translations(
    start_node: Start, http: httpx.AsyncClient
) -> None:
    base, _ = await start_node(models=("whisper-sim", MODEL))
    audio = bytes(range(256)) * 40
    digest = hashlib.blake2b(audio, digest_size=8).hexdigest()
    async with oai(base) as sdk:
        heard = await sdk.audio.transcriptions.create(
            model="whisper-sim", file=("clip.wav", audio, "audio/wav"), language="de"
        )
        told = f"sim transcription of {len(audio)} bytes of audio blake2b {digest} by whisper-sim"
        assert heard.text == f"{told} in de"
        plain = await sdk.audio.transcriptions.create(
            model="whisper-sim", file=("clip.wav", audio), response_format="text"
        )
        assert plain.strip() == told
        with pytest.raises(openai.NotFoundError):
            await sdk.audio.transcriptions.create(model="nope", file=("c.wav", b"abc"))
    assert_openai_error(
        await http.post(f"{base}/v1/audio/transcriptions", json={"model": MODEL}), 400
    )
    # (The SDK's translations are deprecated: over plain HTTP.)
    form = {"model": "whisper-sim", "response_format": "verbose_json"}
    translated = await http.post(
        f"{base}/v1/audio/translations", data=form, files={"file": ("c.wav", b"abc")}
    )
    assert translated.json()["task"] == "translate"
    assert translated.json()["text"].startswith("sim translation of 3 bytes of audio")
    missing = await http.post(
        f"{base}/v1/audio/transcriptions", data={"model": "whisper-sim"}, files={"other": b"x"}
    )
    assert assert_openai_error(missing, 400)["param"] == "file"
    headers = (await stats(http, base))["last_headers"]["/v1/audio/transcriptions"]
    assert headers["content-type"].startswith("multipart/form-data")


async def test_tokenize_and_detokenize(start_node: Start, http: httpx.AsyncClient) -> None:
    base, _ = await start_node()
    other, _ = await start_node()
    tokens = (
        await http.post(f"{base}/tokenize", json={"model": MODEL, "prompt": "tok7 say hello tok0"})
    ).json()
    assert tokens["count"] == 4 and tokens["max_model_len"] == 4096
    assert tokens["tokens"][0] == 7 and tokens["tokens"][3] == 0
    chat = (
        await http.post(f"{base}/tokenize", json={"messages": USER, "return_token_strs": True})
    ).json()
    assert chat["count"] == 2 and chat["token_strs"] == ["say", "hello"]
    assert chat["tokens"] == tokens["tokens"][1:3]  # the same on every node, as a tokenizer
    back = await http.post(f"{base}/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]})
    assert back.json() == {"prompt": "tok7 say hello tok0"}
    answer = await http.post(f"{other}/detokenize", json={"tokens": [1, 2]})
    assert answer.json() == {"prompt": "tok1 tok2"}
    unknown = await http.post(f"{other}/detokenize", json={"tokens": tokens["tokens"]})
    assert_openai_error(unknown, 400)
    assert_openai_error(await http.post(f"{base}/tokenize", json={"model": MODEL}), 400)
    await set_fault(http, base, mode="reset", count=1)
    with pytest.raises(httpx.TransportError):
        await http.post(f"{base}/tokenize", json={"prompt": "x"})
    reset = (await http.post(f"{base}/sim/reset")).json()
    assert reset["paths"] == {} and reset["last_headers"] == {}
