"""The benchmarks' load generator: chat completions sent to a base URL, plain or streamed
(SSE), either open loop on a schedule of arrivals (routing) or closed loop by a fixed number
of clients and one at a time (gateway), checking every answer's length."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from scripts.bench.scenario import Arrival

MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
HEADERS = {"Content-Type": "application/json"}
REQUEST_TIMEOUT_S = 120.0

# What is asked does not matter to a simulated node; each loop keeps the prompt it always sent.
OPEN_LOOP_MESSAGES = [{"role": "user", "content": "Tell me about load balancing."}]
_CLOSED_LOOP_MESSAGES = [{"role": "user", "content": "Say hello to the benchmark."}]
PLAIN_BODY = json.dumps(
    {"model": MODEL, "messages": _CLOSED_LOOP_MESSAGES, "max_tokens": 16}
).encode()
STREAM_BODY = json.dumps(
    {"model": MODEL, "messages": _CLOSED_LOOP_MESSAGES, "max_tokens": 64, "stream": True}
).encode()
STREAM_EVENTS = 64 + 1  # one per token and the last one with finish_reason
TALLY_SAMPLES = 5

EventKind = Literal["done", "error", "data", ""]


def client_session(timeout_s: float = REQUEST_TIMEOUT_S) -> aiohttp.ClientSession:
    """An HTTP client without a connection limit, each request bounded by ``timeout_s``."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)


class EventSplitter:
    """Cuts an SSE body into its events as chunks arrive (an event ends at a blank line)."""

    def __init__(self) -> None:
        self.tail = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events this chunk completes; an incomplete one waits in :attr:`tail`."""
        events = (self.tail + chunk).split(b"\n\n")
        self.tail = events.pop()
        return events


def event_kind(event: bytes) -> EventKind:
    """``done`` for ``[DONE]``, ``error`` for an error payload, ``data`` for any other data
    event, and "" for what is not a data event (comments, keep-alives)."""
    if event == b"data: [DONE]":
        return "done"
    if event.startswith(b'data: {"error"'):
        return "error"
    if event.startswith(b"data:"):
        return "data"
    return ""


# -- open loop: a schedule of arrivals ---------------------------------------------------------


@dataclass(slots=True)
class Result:
    """What became of one scheduled request."""

    at: float  # scheduled arrival, s after the start of the run
    stream: bool
    tokens: int
    replica: int
    chat: int = 0
    ok: bool = False
    error: str = ""
    detail: str = ""
    latency: float = math.nan  # s, arrival to last byte
    ttft: float = math.nan  # s, arrival to the first token event (streams)
    lag: float = 0.0  # s the load generator was late sending it
    node: str = ""
    end: float = math.nan  # s after the start of the run


async def _read_stream(
    resp: aiohttp.ClientResponse, res: Result, start: float, loop: asyncio.AbstractEventLoop
) -> None:
    splitter = EventSplitter()
    done = False
    events = 0
    async for chunk in resp.content.iter_any():
        for event in splitter.feed(chunk):
            kind = event_kind(event)
            if kind == "done":
                done = True
            elif kind == "error":
                res.error, res.detail = "SSE error event", event[:300].decode("utf-8", "replace")
            elif kind == "data":
                events += 1
                if events == 1:
                    res.ttft = loop.time() - start
    if res.error:
        return
    if not done:
        res.error, res.detail = "stream without [DONE]", f"{events} events"
    elif events != res.tokens + 1:  # one per token and the one with finish_reason
        res.error, res.detail = "wrong stream length", f"{events} events for {res.tokens}"


async def send(
    session: aiohttp.ClientSession, base: str, res: Result, start: float, t0: float
) -> None:
    """One request; fills ``res``. ``start`` is its scheduled time on the loop clock."""
    loop = asyncio.get_running_loop()
    body = {
        "model": MODEL,
        "messages": OPEN_LOOP_MESSAGES,
        "max_tokens": res.tokens,
        "stream": res.stream,
    }
    headers = {"X-Session-ID": f"chat-{res.chat}"}
    try:
        async with session.post(base + CHAT_PATH, json=body, headers=headers) as resp:
            res.node = resp.headers.get("x-fleetgate-node", "")
            if resp.status != 200:
                text = await resp.read()
                res.error, res.detail = f"HTTP {resp.status}", text[:300].decode("utf-8", "replace")
            elif res.stream:
                await _read_stream(resp, res, start, loop)
            else:
                data = await resp.json()
                got = data.get("usage", {}).get("completion_tokens")
                if got != res.tokens:
                    res.error, res.detail = "wrong length", f"{got} tokens for {res.tokens}"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        res.error, res.detail = type(exc).__name__, str(exc)[:300]
    now = loop.time()
    res.end = now - t0
    if not res.error:
        res.ok = True
        res.latency = now - start


async def drive(
    session: aiohttp.ClientSession,
    schedule: Sequence[Arrival],
    choose: Callable[[Arrival], tuple[int, str]],
    t0: float,
) -> list[Result]:
    """Open loop: each arrival is sent at ``t0 + at`` (loop clock), whatever is in flight, to
    the (replica index, base URL) that ``choose`` gives it."""
    loop = asyncio.get_running_loop()
    results: list[Result] = []

    async def one(arrival: Arrival) -> None:
        start = t0 + arrival.at
        delay = start - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        index, base = choose(arrival)
        res = Result(arrival.at, arrival.stream, arrival.tokens, index, arrival.chat)
        res.lag = loop.time() - start
        results.append(res)
        await send(session, base, res, start, t0)

    tasks = [asyncio.ensure_future(one(a)) for a in schedule]
    gathered = asyncio.gather(*tasks)
    gathered.add_done_callback(_retrieve)  # when interrupted, nobody else will look at it
    span = schedule[-1].at if schedule else 0.0
    try:
        await asyncio.wait_for(gathered, timeout=span + REQUEST_TIMEOUT_S + 30)
    finally:
        for task in tasks:
            task.cancel()
    return results


def _retrieve(future: asyncio.Future[Any]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        future.exception()


def uniform_choice(bases: Sequence[str]) -> Callable[[Arrival], tuple[int, str]]:
    """A ``choose`` for :func:`drive` that spreads arrivals uniformly, as an L4 balancer does."""

    def choose(arrival: Arrival) -> tuple[int, str]:
        i = min(int(arrival.u * len(bases)), len(bases) - 1)
        return i, bases[i]

    return choose


# -- closed loop: a fixed number of clients ----------------------------------------------------


@dataclass
class Tally:
    """What a load phase saw; errors by kind, with a few sample bodies."""

    ok: int = 0
    events: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        """Count one error of ``kind``, keeping its detail while there is room for samples."""
        self.errors[kind] += 1
        if len(self.samples) < TALLY_SAMPLES:
            self.samples.append(f"{kind}: {detail[:300]}")


async def _plain(session: aiohttp.ClientSession, url: str, tally: Tally) -> bool:
    async with session.post(url, data=PLAIN_BODY, headers=HEADERS) as response:
        body = await response.read()
        if response.status != 200:
            tally.error(f"HTTP {response.status}", body.decode("utf-8", "replace"))
            return False
    tally.ok += 1
    return True


async def _stream(session: aiohttp.ClientSession, url: str, tally: Tally) -> bool:
    async with session.post(url, data=STREAM_BODY, headers=HEADERS) as response:
        if response.status != 200:
            body = await response.read()
            tally.error(f"HTTP {response.status}", body.decode("utf-8", "replace"))
            return False
        splitter = EventSplitter()
        done = False
        total = 0
        async for chunk in response.content.iter_any():
            n = 0
            for event in splitter.feed(chunk):
                kind = event_kind(event)
                if kind == "done":
                    done = True
                elif kind == "error":
                    tally.error("SSE error event", event.decode("utf-8", "replace"))
                elif kind == "data":
                    n += 1
            tally.events += n
            total += n
    if not done:
        tally.error("stream without [DONE]", f"{total} events, tail {splitter.tail[:200]!r}")
        return False
    if total != STREAM_EVENTS:
        tally.error("stream of the wrong length", f"{total} events, expected {STREAM_EVENTS}")
        return False
    tally.ok += 1
    return True


async def request_once(
    session: aiohttp.ClientSession, url: str, stream: bool, tally: Tally
) -> bool:
    """One closed-loop request (16 tokens plain, or a 64-token stream); False if it failed."""
    try:
        if stream:
            return await _stream(session, url, tally)
        return await _plain(session, url, tally)
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.error(type(exc).__name__, str(exc))
        return False


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    *,
    stream: bool,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> tuple[float, Tally]:
    """Requests (or SSE events) per second over ``duration_s`` after ``warmup_s`` of load."""
    tally = Tally()
    stop = False

    async def worker() -> None:
        while not stop:
            if not await request_once(session, url, stream, tally):
                await asyncio.sleep(0.01)  # a failing server must not turn this into a spin

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        count0, t0 = (tally.events if stream else tally.ok), time.perf_counter()
        await asyncio.sleep(duration_s)
        count1, t1 = (tally.events if stream else tally.ok), time.perf_counter()
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    finally:
        for task in tasks:
            task.cancel()
    return (count1 - count0) / (t1 - t0), tally


async def sequential_latency(
    session: aiohttp.ClientSession, urls: dict[str, str], requests: int
) -> tuple[dict[str, list[float]], dict[str, Tally]]:
    """Latencies in ms of ``requests`` plain requests per path, one at a time, interleaved."""
    names = list(urls)
    tallies = {name: Tally() for name in names}
    for _ in range(20):  # warm up the connections
        for name in names:
            await request_once(session, urls[name], False, tallies[name])
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(requests):
        shift = i % len(names)  # rotate the order so that no path always goes first
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            if await request_once(session, urls[name], False, tallies[name]):
                samples[name].append((time.perf_counter() - t0) * 1000)
    return samples, tallies
