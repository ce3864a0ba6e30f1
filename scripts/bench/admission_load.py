"""The admission benchmark's load (scripts/bench_admission.py): closed client loops per key and
the open-loop stream of high-priority requests, sent through the gateway replicas with each
key's bearer token, and what became of every request.

Invariants:

- Every request gets exactly one :class:`Outcome`, made before it is sent: answered (200 and a
  whole answer of the asked length), refused (429 or 503 carrying Retry-After) or lost
  (anything else: another status, a refusal without Retry-After, a broken or short answer, a
  connection error, the client's timeout).
- A loop sends its next request as soon as its previous one ended; after a refusal it waits the
  Retry-After it was given (a polite client), never past the end of the run; none starts a
  request after the end, and every request started is waited for (up to the client timeout).
- TTFT is from the send to the first chunk carrying content; the queue wait is the gateway's
  own ``queued_ms`` from the ``x-fleetgate-route`` receipt (absent: admitted at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from scripts.bench.admission_workload import HIGH, KEYS, AdmissionScenario, HighArrival
from scripts.bench.admission_workload import loop_lengths as lengths_of
from scripts.bench.load import CHAT_PATH, MODEL, EventSplitter, event_kind

MESSAGES = [{"role": "user", "content": "Tell me about fleet-wide admission."}]
REFUSALS = (429, 503)
_QUEUED = re.compile(r"queued_ms=(\d+(?:\.\d+)?)")
SAMPLE_EVERY_S = 1.0


@dataclass(slots=True)
class Outcome:
    """What became of one request; times in s after the start of the run."""

    key: str  # "a", "b" or "high"
    sent: float
    tokens: int
    replica: int
    done: float = math.nan
    status: int = 0  # 0: no HTTP answer at all
    retry_after: str = ""
    ok: bool = False
    error: str = ""
    detail: str = ""
    ttft: float = math.nan  # s (streams)
    queued_ms: float | None = None
    node: str = ""

    @property
    def fate(self) -> str:
        """answered, refused (429/503 with Retry-After) or lost."""
        if self.ok:
            return "answered"
        if self.status in REFUSALS and self.retry_after:
            return "refused"
        return "lost"


async def _read_stream(
    resp: aiohttp.ClientResponse, out: Outcome, start: float, loop: asyncio.AbstractEventLoop
) -> None:
    splitter = EventSplitter()
    pieces = 0
    done = False
    async for chunk in resp.content.iter_any():
        for event in splitter.feed(chunk):
            kind = event_kind(event)
            if kind == "done":
                done = True
            elif kind == "error":
                out.error, out.detail = "SSE error event", event[:300].decode("utf-8", "replace")
            elif kind == "data":
                for choice in json.loads(event[len(b"data:") :]).get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        if not pieces:
                            out.ttft = loop.time() - start
                        pieces += 1
    if not out.error and (not done or pieces != out.tokens):
        out.error, out.detail = "broken stream", f"{pieces} of {out.tokens} tokens, done {done}"


async def send(
    session: aiohttp.ClientSession,
    base: str,
    token: str,
    out: Outcome,
    *,
    stream: bool,
    priority: str | None,
    t0: float,
) -> None:
    """Send ``out``'s request to the replica at ``base`` and fill in what became of it."""
    loop = asyncio.get_running_loop()
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": out.tokens,
        "temperature": 0,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {token}"}
    if priority:
        headers["x-fleetgate-priority"] = priority
    start = loop.time()
    try:
        async with session.post(base + CHAT_PATH, json=body, headers=headers) as resp:
            out.status = resp.status
            out.retry_after = resp.headers.get("Retry-After", "")
            out.node = resp.headers.get("x-fleetgate-node", "")
            if found := _QUEUED.search(resp.headers.get("x-fleetgate-route", "")):
                out.queued_ms = float(found.group(1))
            if resp.status != 200:
                text = await resp.read()
                out.error, out.detail = f"HTTP {resp.status}", text[:300].decode("utf-8", "replace")
            elif stream:
                await _read_stream(resp, out, start, loop)
            else:
                usage = (await resp.json()).get("usage") or {}
                if usage.get("completion_tokens") != out.tokens:
                    out.error, out.detail = "short answer", f"usage {usage}"[:300]
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
        out.error, out.detail = type(exc).__name__, str(exc)[:300]
    out.done = loop.time() - t0
    out.ok = not out.error


@dataclass(frozen=True, slots=True)
class Drive:
    """Where and how one run sends: the replicas' base URLs, each key's secret, the scenario,
    the seed, and whether the client loops run (False: the high stream alone)."""

    bases: Sequence[str]
    secrets: dict[str, str]
    scenario: AdmissionScenario
    seed: int
    loops: bool = True


async def _client_loop(
    session: aiohttp.ClientSession,
    drive: Drive,
    key: str,
    index: int,
    t0: float,
    out: list[Outcome],
) -> None:
    loop = asyncio.get_running_loop()
    lengths = lengths_of(drive.seed, key, index)
    scenario = drive.scenario
    replica = index % len(drive.bases)
    while (now := loop.time() - t0) < scenario.duration_s:
        tokens = lengths.randint(scenario.min_tokens, scenario.max_tokens)
        result = Outcome(key, now, tokens, replica)
        out.append(result)
        base, secret = drive.bases[replica], drive.secrets[key]
        await send(session, base, secret, result, stream=False, priority=None, t0=t0)
        pause = 0.0
        if result.fate == "refused":
            with contextlib.suppress(ValueError):
                pause = float(result.retry_after)
        elif result.fate == "lost":
            pause = 0.1  # no hot loop on a refused connection
        await asyncio.sleep(min(pause, max(0.0, t0 + scenario.duration_s - loop.time())))


async def _high(
    session: aiohttp.ClientSession,
    drive: Drive,
    arrival: HighArrival,
    t0: float,
    out: list[Outcome],
) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + arrival.at - loop.time()))
    result = Outcome(HIGH, loop.time() - t0, arrival.tokens, arrival.replica)
    out.append(result)
    base, secret = drive.bases[arrival.replica], drive.secrets[HIGH]
    await send(session, base, secret, result, stream=True, priority="high", t0=t0)


def queue_depth(page: str) -> float:
    """The requests a replica has waiting in the fleet's queue, from its /metrics page."""
    total = 0.0
    for line in page.splitlines():
        if line.startswith(("fleetgate_queue_depth{", "fleetgate_queue_depth ")):
            with contextlib.suppress(ValueError):
                total += float(line.rpartition(" ")[2])
    return total


async def _sample_depth(
    session: aiohttp.ClientSession, drive: Drive, t0: float, samples: list[tuple[float, float]]
) -> None:
    """Every second: the fleet's queue depth, summed over the replicas."""
    loop = asyncio.get_running_loop()
    while True:
        depth = 0.0
        for base in drive.bases:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(base + "/metrics") as resp:
                    depth += queue_depth(await resp.text())
        samples.append((loop.time() - t0, depth))
        await asyncio.sleep(SAMPLE_EVERY_S)


async def drive_run(
    session: aiohttp.ClientSession, drive: Drive, schedule: Sequence[HighArrival]
) -> tuple[list[Outcome], list[tuple[float, float]], float]:
    """One run: the client loops (unless ``drive.loops`` is False) and the high stream, from a
    start 0.2 s ahead; every outcome, the queue depth sampled each second, and the wall-clock
    time of the start (the nodes' idle gaps are stamped in wall-clock time)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2
    wall0 = time.time() + 0.2
    outcomes: list[Outcome] = []
    samples: list[tuple[float, float]] = []
    tasks = [asyncio.ensure_future(_high(session, drive, a, t0, outcomes)) for a in schedule]
    if drive.loops:
        for key in KEYS:
            for index in range(drive.scenario.loops[key]):
                tasks.append(
                    asyncio.ensure_future(_client_loop(session, drive, key, index, t0, outcomes))
                )
    sampler = asyncio.ensure_future(_sample_depth(session, drive, t0, samples))
    limit = drive.scenario.duration_s + drive.scenario.client_timeout_s + 30
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=limit)
    finally:
        for task in [*tasks, sampler]:
            task.cancel()
        await asyncio.gather(*tasks, sampler, return_exceptions=True)
    return outcomes, samples, wall0
