"""Tracing end to end: a gateway process and a health-checker exporting OTLP/HTTP to a receiver
started here, a request sent through the openai SDK with the client's ``traceparent`` continued
into the simulated node (a relay in front of it keeps the heads the gateway wrote); and, tracing
off, a serving gateway that never imports OpenTelemetry's tracing and passes the client's
``traceparent`` through unchanged."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support import MODEL
from tests.support.clients import async_sdk
from tests.support.harness import free_port, wait_for_port
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode
from tests.support.tap import Tap

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
CLIENT_PARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
# What tracing would import; the gateway must import none of it while tracing is off.
TRACING_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter", "opentelemetry.propagate")
NO_OTEL = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": "",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
    "OTEL_TRACES_EXPORTER": "",
}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    started = OtlpReceiver()
    yield started
    started.close()


@pytest.fixture
def tapped(procs: list[Process]) -> Iterator[Tap]:
    """A simulated node behind a :class:`Tap`: register the tap's URL."""
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    tap = Tap(node.port)
    yield tap
    tap.close()


def start_checker(procs: list[Process], redis_url: str, env: dict[str, str]) -> None:
    args = ["--redis-url", redis_url, "--checker-id", "c-traced", "--interval", "0.2"]
    checker = Process(
        [sys.executable, "-m", "gateway.cli", "health-checker", *args], "checker-traced", env
    )
    procs.append(checker)


async def test_spans_reach_an_otlp_receiver_and_the_trace_reaches_the_node(
    redis_url: str, procs: list[Process], receiver: OtlpReceiver, tapped: Tap
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    gateway = Gateway("--redis-url", redis_url, "--node", tapped.url, env=env)
    procs.append(gateway)
    gateway.wait_models(MODEL)
    start_checker(procs, redis_url, env)

    client = async_sdk(gateway.url)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=CHAT, max_tokens=4, extra_headers={"traceparent": CLIENT_PARENT}
        )
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        streamed = [chunk async for chunk in stream]
    finally:
        await client.close()
    completion = raw.parse()
    assert completion.usage is not None and streamed[-1].usage is not None

    def checker_spans() -> list[ReceivedSpan]:
        return [s for s in receiver.spans if s.service == "fleetgate-health-checker"]

    def gateway_servers() -> list[ReceivedSpan]:
        return [s for s in receiver.spans if s.kind == "SERVER"]

    async def arrived() -> bool:
        kinds = {s.kind for s in receiver.of_trace(TRACE_ID)}
        rounds = [s for s in checker_spans() if s.name == "fleetgate.probe_round"]
        return {"SERVER", "CLIENT", "INTERNAL"} <= kinds and bool(rounds)

    assert await eventually(arrived, 15), (receiver.spans, gateway.output()[-3000:])
    spans = receiver.of_trace(TRACE_ID)
    (server,) = [s for s in spans if s.kind == "SERVER"]
    (pick,) = [s for s in spans if s.name == "fleetgate.pick"]
    (attempt,) = [s for s in spans if s.kind == "CLIENT"]
    assert server.service == "fleetgate-gateway"
    assert server.name == "POST /v1/chat/completions"
    assert server.parent_id == CLIENT_SPAN
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["gen_ai.operation.name"] == "chat"
    assert server.attributes["gen_ai.request.model"] == MODEL
    assert server.attributes["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert server.attributes["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert pick.parent_id == attempt.parent_id == server.span_id
    assert pick.attributes["fleetgate.node"] == attempt.attributes["fleetgate.node"] == tapped.url
    assert pick.attributes["fleetgate.strategy"] == "min_expected_latency"
    assert attempt.attributes["http.response.status_code"] == 200
    # The node was handed the gateway's attempt as its parent, in the client's trace; the
    # streamed request's attempt had its own trace.
    first, streamed_parent = tapped.traceparents()
    assert first == f"00-{TRACE_ID}-{attempt.span_id}-01"

    # The streamed request had no traceparent: a trace of its own, its usage from the stream.
    (streamed_server,) = [s for s in gateway_servers() if s.trace_id != TRACE_ID]
    assert streamed_server.parent_id == ""
    assert streamed_parent.split("-")[1] == streamed_server.trace_id
    assert streamed_server.attributes["gen_ai.usage.output_tokens"] == 3

    probes = [s for s in checker_spans() if s.name == "fleetgate.probe"]
    rounds = {s.span_id: s for s in checker_spans() if s.name == "fleetgate.probe_round"}
    probed = [p for p in probes if p.attributes["fleetgate.node"] == tapped.url]
    # (the last round may still run, its probes exported before it)
    assert any(p.parent_id in rounds for p in probed)
    assert all(r.attributes["fleetgate.checker"] == "c-traced" for r in rounds.values())


def otel_modules_of(output: str) -> set[str]:
    """The OpenTelemetry modules a ``python -X importtime`` process reported importing."""
    found = set()
    for line in output.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[1].strip()
            if name.startswith("opentelemetry"):
                found.add(name)
    return found


async def test_off_the_gateway_imports_no_tracing_and_relays_the_traceparent(
    procs: list[Process], tapped: Tap
) -> None:
    port = free_port()
    argv = [sys.executable, "-X", "importtime", "-m", "gateway", "--port", str(port)]
    gateway = Process([*argv, "--node", tapped.url], "gw-untraced", NO_OTEL)
    procs.append(gateway)
    wait_for_port(port, timeout_s=20)
    url = f"http://127.0.0.1:{port}"
    headers = {"traceparent": CLIENT_PARENT, "tracestate": "vendor=1"}
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2}

    async with httpx.AsyncClient(timeout=10) as http:

        async def answered() -> bool:
            answer = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            return answer.status_code == 200

        assert await eventually(answered, 10), gateway.output()[-3000:]
        answer = await http.post(
            f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=headers
        )
        assert answer.status_code == 200
    # Unchanged, and once: the client's header is the only one.
    relayed = tapped.traceparents()
    assert len(relayed) >= 2 and set(relayed) == {CLIENT_PARENT}
    assert gateway.terminate() == 0

    imported = otel_modules_of(gateway.output())
    assert not [m for m in imported if m.startswith(TRACING_MODULES)], sorted(imported)
    # redis-py imports OpenTelemetry's metrics SDK when it is installed: nothing beyond that.
    by_redis = await asyncio.to_thread(otel_modules_of_redis)
    assert imported <= by_redis, sorted(imported - by_redis)


def otel_modules_of_redis() -> set[str]:
    """The OpenTelemetry modules ``import redis.asyncio`` imports on its own."""
    probe = "import redis.asyncio, sys; print(*[m for m in sys.modules if 'opentelemetry' in m])"
    return set(
        subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **NO_OTEL},
            check=True,
        ).stdout.split()
    )
