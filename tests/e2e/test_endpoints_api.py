"""The rest of the API end to end, through the official SDKs: OpenAI's Responses API with its state
routed across two replicas sharing Redis (a chain of turns alternating replicas under
round_robin reaches the one node that holds it), Anthropic's Messages API with errors in its own
shape, audio, rerank, score and tokenize (the endpoint table: gateway/replica/endpoints.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.support import MODEL
from tests.support.clients import async_sdk
from tests.support.harness import RedisServer
from tests.support.processes import Gateway, Process, SimNode, ops

KEY = "sk-endpoints-0123456789abcdef"


@dataclass
class Fleet:
    nodes: list[SimNode]
    gateways: list[Gateway]
    redis_url: str

    def node(self, url: str) -> SimNode:
        return next(n for n in self.nodes if n.url == url)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """One fleet for the module (its own Redis): a test that changes it puts it back."""
    redis = RedisServer().start()
    procs: list[Process] = []
    try:
        nodes = [SimNode("--tokens-per-s", "200", name=f"api{i}") for i in range(2)]
        procs += nodes
        for node in nodes:
            assert ops(redis.url, "nodes", "add", node.url, "--model", MODEL).returncode == 0
        gateways = [
            Gateway("--redis-url", redis.url, "--strategy", "round_robin", name=f"apigw{i}")
            for i in range(2)
        ]
        procs += gateways
        for gateway in gateways:
            gateway.wait_models(MODEL)
        yield Fleet(nodes, gateways, redis.url)
    finally:
        for proc in reversed(procs):
            proc.close()
        redis.close()


@pytest.fixture(autouse=True)
def healthy_nodes(fleet: Fleet) -> Iterator[None]:
    for node in fleet.nodes:
        node.fault("none")
    yield


@pytest.fixture
async def clients(fleet: Fleet) -> AsyncIterator[list[openai.AsyncOpenAI]]:
    made = [async_sdk(g.url, timeout=30) for g in fleet.gateways]
    yield made
    for client in made:
        await client.close()


async def test_a_chain_of_responses_stays_on_its_node_across_replicas(
    fleet: Fleet, clients: list[openai.AsyncOpenAI]
) -> None:
    """Six turns alternating replicas, round_robin routing: every turn after the first names
    the one before, and only the node that made it holds it (any other answers 404)."""
    before = [n.stats()["paths"].get("/v1/responses", 0) for n in fleet.nodes]
    raw = await clients[0].responses.with_raw_response.create(
        model=MODEL, input="say hello", max_output_tokens=4
    )
    first = raw.parse()
    holder = raw.headers["x-fleetgate-node"]
    previous, tokens = first.id, first.usage.input_tokens if first.usage else 0
    for turn in range(1, 6):
        raw = await clients[turn % 2].responses.with_raw_response.create(
            model=MODEL,
            input="and then four more",
            previous_response_id=previous,
            max_output_tokens=4,
        )
        answer = raw.parse()
        assert raw.headers["x-fleetgate-node"] == holder  # pinned, whatever round_robin says
        assert answer.usage is not None and answer.usage.input_tokens > tokens  # continued
        previous, tokens = answer.id, answer.usage.input_tokens
    # Meanwhile round_robin spread other traffic over both nodes.
    for client in clients:
        await client.responses.create(model=MODEL, input="fresh", max_output_tokens=1)
    paths = [
        n.stats()["paths"].get("/v1/responses", 0) - b
        for n, b in zip(fleet.nodes, before, strict=True)
    ]
    assert all(paths) and sum(paths) == 8

    # By id, from either replica: retrieve, the input items, then delete; deleted is unknown.
    other = clients[1]
    assert (await other.responses.retrieve(previous)).id == previous
    items = await other.responses.input_items.list(previous)
    assert len(items.data) >= 2
    await clients[0].responses.delete(previous)
    with pytest.raises(openai.NotFoundError) as gone:
        await other.responses.retrieve(previous)
    assert gone.value.code == "response_not_found"


async def test_a_streamed_response_is_recorded_before_it_ends(
    fleet: Fleet, clients: list[openai.AsyncOpenAI]
) -> None:
    stream = await clients[0].responses.create(
        model=MODEL, input="stream me", max_output_tokens=5, stream=True
    )
    kinds, response_id, text = [], "", ""
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.created":
            response_id = event.response.id
        elif event.type == "response.output_text.delta":
            text += event.delta
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert text.split() == [f"tok{i}" for i in range(5)]
    # The next turn, on the other replica, finds its node: twice, so round_robin would have
    # sent one of them elsewhere.
    for _ in range(2):
        answer = await clients[1].responses.create(
            model=MODEL, input="next", previous_response_id=response_id, max_output_tokens=1
        )
        assert answer.previous_response_id == response_id
    # The SDK's stream helper, continuing it from the other replica again.
    async with clients[1].responses.stream(
        model=MODEL, input="last", previous_response_id=response_id, max_output_tokens=3
    ) as helper:
        async for _event in helper:
            pass
        final = await helper.get_final_response()
    assert final.previous_response_id == response_id
    assert final.output_text.split() == [f"tok{i}" for i in range(3)]


async def test_unknown_and_unavailable_responses_are_clear_errors(
    fleet: Fleet, clients: list[openai.AsyncOpenAI]
) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        await clients[0].responses.create(
            model=MODEL, input="x", previous_response_id="resp_" + "0" * 32
        )
    assert unknown.value.code == "response_not_found"
    assert unknown.value.param == "previous_response_id"

    raw = await clients[0].responses.with_raw_response.create(
        model=MODEL, input="hold me", max_output_tokens=1
    )
    held, node = raw.parse().id, raw.headers["x-fleetgate-node"]
    drained = await asyncio.to_thread(ops, fleet.redis_url, "nodes", "drain", node, "--no-wait")
    assert drained.returncode == 0, drained.stderr
    await asyncio.sleep(1.2)  # every replica follows the registry within a second
    for client in clients:
        with pytest.raises(openai.InternalServerError) as unavailable:
            await client.responses.create(
                model=MODEL, input="again", previous_response_id=held, max_output_tokens=1
            )
        assert unavailable.value.status_code == 503
        assert unavailable.value.code == "response_engine_unavailable"
        assert "draining" in unavailable.value.message
    back = await asyncio.to_thread(ops, fleet.redis_url, "nodes", "set", node, "--state", "active")
    assert back.returncode == 0, back.stderr
    await asyncio.sleep(1.2)
    # Back in service, the node continues its response: nothing was started elsewhere.
    answer = await clients[1].responses.create(
        model=MODEL, input="again", previous_response_id=held, max_output_tokens=1
    )
    assert answer.previous_response_id == held


async def test_anthropic_messages_through_its_sdk(fleet: Fleet) -> None:
    added = await asyncio.to_thread(ops, fleet.redis_url, "keys", "add", "claude", "--key", KEY)
    assert added.returncode == 0, added.stderr
    await asyncio.sleep(1.2)  # every replica learns that keys are required
    gateway = fleet.gateways[0]
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=KEY, max_retries=0)
    try:
        message = await client.messages.create(
            model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}]
        )
        texts = [b.text.split() for b in message.content if b.type == "text"]
        assert texts == [["tok0", "tok1", "tok2"]]
        assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3
        async with client.messages.stream(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "stream"}]
        ) as stream:
            streamed = "".join([text async for text in stream.text_stream])
        assert streamed.split() == [f"tok{i}" for i in range(4)]
        counted = await client.messages.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": "one two three"}]
        )
        assert counted.input_tokens == 3

        # Errors fleetgate writes itself are in Anthropic's shape.
        with pytest.raises(anthropic.NotFoundError) as unknown:
            await client.messages.create(
                model="no-such-model", max_tokens=1, messages=[{"role": "user", "content": "x"}]
            )
        body = unknown.value.body
        assert isinstance(body, dict) and set(body) == {"type", "error"}
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
        assert "no-such-model" in body["error"]["message"]
    finally:
        await client.close()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        # x-api-key is the client's key as Anthropic's own clients send it: accepted, and never
        # passed on; anthropic-version is.
        response = await http.post(
            "/v1/messages",
            json={"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        )
        assert response.status_code == 200, response.text
        denied = await http.post(
            "/v1/messages",
            json={"model": MODEL, "max_tokens": 1, "messages": []},
            headers={"x-api-key": "wrong"},
        )
    assert denied.status_code == 401
    assert orjson.loads(denied.content)["error"]["type"] == "authentication_error"
    assert orjson.loads(denied.content)["type"] == "error"
    seen = [n.stats()["last_headers"].get("/v1/messages") for n in fleet.nodes]
    last = [h for h in seen if h and h.get("anthropic-version") == "2023-06-01"]
    assert last and not last[0].get("x-api-key")
    assert KEY not in str(last[0].get("authorization"))
    # Open again for the module's other tests.
    for command in (("keys", "revoke", "claude"), ("keys", "open")):
        done = await asyncio.to_thread(ops, fleet.redis_url, *command)
        assert done.returncode == 0, done.stderr
    await asyncio.sleep(1.2)


async def test_a_cut_stream_ends_with_its_protocols_error_event(fleet: Fleet) -> None:
    for node in fleet.nodes:
        node.fault("die_mid_stream", after_tokens=2)
    async with httpx.AsyncClient(base_url=fleet.gateways[0].url, timeout=10) as http:
        messages = await http.post(
            "/v1/messages",
            json={
                "model": MODEL,
                "max_tokens": 10,
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        responses = await http.post(
            "/v1/responses",
            json={"model": MODEL, "input": "x", "max_output_tokens": 10, "stream": True},
        )
    assert "event: error" in messages.text
    error = orjson.loads(messages.text.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "event: error" in responses.text
    error = orjson.loads(responses.text.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])
    assert error["type"] == "error" and error["code"] == "upstream_stream_error"


async def test_audio_rerank_score_and_tokenize(
    fleet: Fleet, clients: list[openai.AsyncOpenAI]
) -> None:
    audio = bytes(range(256)) * 400  # 100 KiB
    transcript = await clients[0].audio.transcriptions.create(
        model=MODEL, file=("clip.wav", audio, "audio/wav")
    )
    assert str(len(audio)) in transcript.text  # the file arrived whole
    async with httpx.AsyncClient(base_url=fleet.gateways[0].url, timeout=10) as http:
        # (the SDK's translations call is deprecated: the form as it would send it)
        translated = await http.post(
            "/v1/audio/translations",
            data={"model": MODEL},
            files={"file": ("clip.wav", audio, "audio/wav")},
        )
        assert translated.status_code == 200, translated.text
        assert str(len(audio)) in translated.json()["text"]
        for path in ("/v1/rerank", "/rerank"):
            ranked = await http.post(
                path,
                json={"model": MODEL, "query": "red fox", "documents": ["a red fox", "blue"]},
            )
            assert ranked.status_code == 200, ranked.text
            assert [r["index"] for r in ranked.json()["results"]] == [0, 1]
        score = await http.post(
            "/v1/score", json={"model": MODEL, "text_1": "a b", "text_2": "a b"}
        )
        assert score.status_code == 200 and score.json()["data"][0]["score"] > 0
        tokens = await http.post("/tokenize", json={"model": MODEL, "prompt": "tok1 tok2"})
        assert tokens.json()["tokens"] == [1, 2]
        text = await http.post("/detokenize", json={"model": MODEL, "tokens": [1, 2]})
        assert text.json()["prompt"].split() == ["tok1", "tok2"]
        # The model is read from the form: a form without one is refused before any node.
        empty = await http.post(
            "/v1/audio/transcriptions", files={"file": ("clip.wav", b"x", "audio/wav")}
        )
        assert empty.status_code == 400 and empty.json()["error"]["code"] == "missing_model"
        unknown = await http.post(
            "/v1/audio/transcriptions",
            data={"model": "nope"},
            files={"file": ("clip.wav", b"x", "audio/wav")},
        )
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"
