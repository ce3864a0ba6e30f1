"""Nodes failing under load, through a real replica on a real Redis: a node that hangs, one that
resets connections, one that dies mid-stream, and one that flaps between healthy and failing.

Each test asserts what the clients saw (statuses, SSE events), that no lease leaked (every
node's in-flight back to 0) and what ``/metrics`` said (retries, ejections, stream errors);
it prints its figures (ok and failed counts) for the reliability notes.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx
import orjson
import pytest

from tests.support import MODEL
from tests.support.openai_errors import assert_openai_error, assert_openai_error_body
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, together

pytestmark = pytest.mark.faults

MAX_FLAP_REQUESTS = 5_000  # the flapping load lasts ten turns of 200 ms, or this many requests
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def start_fleet(
    procs: list[Process], redis_url: str, nodes: int, *flags: str, tokens_per_s: str = "200"
) -> tuple[Gateway, list[SimNode]]:
    sims = together(
        procs,
        [
            SimNode("--tokens-per-s", tokens_per_s, name=f"node{i}", listening=False)
            for i in range(nodes)
        ],
    )
    args = ["--redis-url", redis_url, *flags]
    for sim in sims:
        args += ["--node", sim.url]
    gateway = Gateway(*args, name="faultgw")
    procs.append(gateway)
    gateway.wait_models(MODEL)
    return gateway, sims


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for match in re.finditer(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def leases_left(http: httpx.AsyncClient, gateway: Gateway) -> dict[str, int]:
    status = (await http.get(f"{gateway.url}/nodes/status")).json()
    return {url: int(entry["unfinished"]) for url, entry in status.items()}


async def assert_no_lease_left(http: httpx.AsyncClient, gateway: Gateway) -> None:
    async def drained() -> bool:
        return not any((await leases_left(http, gateway)).values())

    assert await eventually(drained, 10), await leases_left(http, gateway)


async def run_load(
    count: int, concurrency: int, one: Callable[[int], Awaitable[httpx.Response]]
) -> list[httpx.Response]:
    """``count`` calls of ``one``, at most ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> httpx.Response:
        async with gate:
            return await one(i)

    return list(await asyncio.gather(*(bounded(i) for i in range(count))))


def attempts_of(response: httpx.Response) -> int:
    found = re.search(r"attempts=(\d+)", response.headers.get("x-fleetgate-route", ""))
    return int(found.group(1)) if found else 0


def assert_clean_log(gateway: Gateway) -> None:
    output = gateway.output()
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.parametrize("fault", ["hang", "reset"])
async def test_a_hung_or_resetting_node_is_retried_elsewhere(
    redis_url: str, procs: list[Process], fault: str
) -> None:
    gateway, (bad, *_) = start_fleet(
        procs, redis_url, 3, "--first-byte-timeout", "0.5", "--strategy", "round_robin"
    )
    bad.fault(fault)
    async with httpx.AsyncClient(timeout=30) as http:
        url = f"{gateway.url}/v1/chat/completions"
        responses = await run_load(30, 5, lambda i: http.post(url, json=CHAT))
        statuses = Counter(r.status_code for r in responses)
        served_by = Counter(r.headers.get("x-fleetgate-node") for r in responses)
        retried = sum(1 for r in responses if attempts_of(r) > 1)
        print(
            f"{fault}: ok {statuses[200]}, failed {len(responses) - statuses[200]}, "
            f"retried {retried}, served by {dict(served_by)}"
        )
        # Every client got an answer from a good node; some only after a retry.
        assert statuses == {200: 30}
        assert bad.url not in served_by
        assert retried >= 1
        metrics = (await http.get(f"{gateway.url}/metrics")).text
        assert metric(metrics, "fleetgate_retries_total") == retried
        failed_attempts = metric(
            metrics, "fleetgate_upstream_attempts_total", node=bad.url, result="error"
        )
        assert failed_attempts >= retried
        bad.fault("none")  # a hung node lets go of its requests
        await assert_no_lease_left(http, gateway)
    assert_clean_log(gateway)


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


async def test_a_node_dying_mid_stream_ends_the_stream_with_an_error_event(
    redis_url: str, procs: list[Process]
) -> None:
    gateway, (node,) = start_fleet(procs, redis_url, 1)
    node.fault("die_mid_stream", after_tokens=3)
    body = {**CHAT, "max_tokens": 10, "stream": True}
    async with httpx.AsyncClient(timeout=30) as http:
        url = f"{gateway.url}/v1/chat/completions"

        async def stream(i: int) -> httpx.Response:
            async with http.stream("POST", url, json=body) as response:
                await response.aread()
            return response

        responses = await run_load(10, 5, stream)
        broken = 0
        for response in responses:
            # The stream had begun: a 200, three tokens, then the error, never "[DONE]".
            assert response.status_code == 200
            events = sse_events(response.text)
            assert "[DONE]" not in events
            tokens = [orjson.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
            assert tokens == ["tok0 ", "tok1 ", "tok2 "]
            error = assert_openai_error_body(orjson.loads(events[-1]), "upstream_stream_error")
            assert error["type"] == "upstream_error"
            broken += 1
        print(f"die_mid_stream: ok 0, failed {broken} (each ended by an SSE error event)")
        metrics = (await http.get(f"{gateway.url}/metrics")).text
        assert metric(metrics, "fleetgate_stream_errors_total", node=node.url) == broken
        assert metric(metrics, "fleetgate_retries_total") == 0  # never after the first byte
        await assert_no_lease_left(http, gateway)
        # Healthy again, the node serves whole streams.
        node.fault("none")
        async with http.stream("POST", url, json=body) as whole:
            assert sse_events((await whole.aread()).decode())[-1] == "[DONE]"
    assert_clean_log(gateway)


async def test_a_flapping_node_is_ejected_and_the_others_serve(
    redis_url: str, procs: list[Process]
) -> None:
    gateway, (flapping, *steady) = start_fleet(procs, redis_url, 3, tokens_per_s="inf")
    switches = 10
    stop = asyncio.Event()

    async def flap() -> None:
        """Failing (503) and healthy in turns of 200 ms, ``switches`` times, under the load."""
        for turn in range(switches):
            await asyncio.to_thread(flapping.fault, "status_503" if turn % 2 == 0 else "none")
            await asyncio.sleep(0.2)
        stop.set()

    async with httpx.AsyncClient(timeout=30) as http:
        url = f"{gateway.url}/v1/chat/completions"
        responses: list[httpx.Response] = []

        async def client() -> None:
            while not stop.is_set() and len(responses) < MAX_FLAP_REQUESTS:
                responses.append(await http.post(url, json=CHAT))

        started = time.monotonic()
        await asyncio.gather(flap(), *(client() for _ in range(6)))
        elapsed_s = time.monotonic() - started
        flapping.fault("none")
        statuses = Counter(r.status_code for r in responses)
        served_by = Counter(r.headers.get("x-fleetgate-node") for r in responses)
        metrics = (await http.get(f"{gateway.url}/metrics")).text
        ejections = metric(metrics, "fleetgate_ejections_total", node=flapping.url)
        retries = metric(metrics, "fleetgate_retries_total")
        refused = metric(metrics, "fleetgate_retry_budget_exhausted_total")
        print(
            f"flapping: ok {statuses[200]}, failed {len(responses) - statuses[200]}, "
            f"retries {retries:g}, budget refusals {refused:g}, ejections {ejections:g}, "
            f"switches {switches} in {elapsed_s:.1f} s, served by {dict(served_by)}"
        )
        # Passive ejection took the flapping node out; the steady nodes served everyone, a
        # request that met the failing node retried elsewhere (only a spent retry budget
        # could leave a client with an error, and then an OpenAI-shaped 503).
        assert ejections >= 1
        assert statuses[200] + statuses[503] == len(responses)
        assert statuses[503] <= refused
        for response in responses:
            if response.status_code != 200:
                assert_openai_error(response, 503)
        assert served_by[steady[0].url] > 0 and served_by[steady[1].url] > 0
        assert retries >= 1
        await assert_no_lease_left(http, gateway)
        state = (await http.get(f"{gateway.url}/nodes/status")).json()[flapping.url]
        print(f"flapping node after the load: {state}")
    assert_clean_log(gateway)
