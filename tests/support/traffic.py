"""Client traffic through gateway replicas while a dependency is broken, and a watch on what
the replicas say meanwhile: every request's outcome and every ``/ready`` and
``fleetgate_degraded`` reading are recorded with their time, bounded in count and rate."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from tests.support import MODEL
from tests.support.clients import async_sdk

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@dataclass(frozen=True, slots=True)
class Answer:
    """One request: when it was sent (monotonic s), its status (0: no HTTP answer)."""

    sent_s: float
    status: int
    detail: str = ""


@dataclass
class Traffic:
    """Chat requests from ``workers`` concurrent clients, round robin over ``urls``, each
    pausing ``pause_s`` between requests, ``max_requests`` at most in all."""

    urls: list[str]
    workers: int = 4
    pause_s: float = 0.02
    max_requests: int = 5000
    timeout_s: float = 10.0
    answers: list[Answer] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _sent: itertools.count[int] = field(default_factory=itertools.count)

    def start(self) -> Traffic:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work(i)) for i in range(self.workers)]
        return self

    async def finish(self) -> list[Answer]:
        """Wait until all ``max_requests`` are answered; every answer."""
        await asyncio.gather(*self._tasks)
        return self.answers

    async def stop(self) -> list[Answer]:
        """Let the requests under way finish, send no more; every answer so far."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        return self.answers

    async def _work(self, index: int) -> None:
        clients = [async_sdk(url, timeout=self.timeout_s) for url in self.urls]
        try:
            for turn in itertools.count(index):
                if self._stopping.is_set() or next(self._sent) >= self.max_requests:
                    return
                self.answers.append(await self._one(clients[turn % len(clients)]))
                await asyncio.sleep(self.pause_s)
        finally:
            for client in clients:
                await client.close()

    async def _one(self, client: openai.AsyncOpenAI) -> Answer:
        sent = time.monotonic()
        try:
            completion = await client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=1
            )
        except openai.APIStatusError as exc:
            return Answer(sent, exc.status_code, exc.message)
        except openai.APIError as exc:
            return Answer(sent, 0, type(exc).__name__)
        return Answer(sent, 200 if completion.choices else 0)


def tally(
    answers: list[Answer], since_s: float = 0.0, until_s: float = float("inf")
) -> Counter[int]:
    """Answers sent within [since_s, until_s), counted by status."""
    return Counter(a.status for a in answers if since_s <= a.sent_s < until_s)


@dataclass(frozen=True, slots=True)
class Reading:
    """One look at one replica: its /ready status and its fleetgate_degraded gauge."""

    at_s: float
    url: str
    ready: int
    degraded: float


@dataclass
class Watch:
    """Reads each replica's ``/ready`` and ``/metrics`` every ``interval_s`` until stopped."""

    urls: list[str]
    interval_s: float = 0.1
    readings: list[Reading] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> Watch:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def stop(self) -> list[Reading]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.readings

    async def _watch(self) -> None:
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                for url in self.urls:
                    with contextlib.suppress(httpx.HTTPError):
                        ready = (await http.get(f"{url}/ready")).status_code
                        text = (await http.get(f"{url}/metrics")).text
                        self.readings.append(
                            Reading(time.monotonic(), url, ready, degraded_of(text))
                        )
                await asyncio.sleep(self.interval_s)

    def span_s(self, since_s: float, *, degraded: bool) -> float:
        """Seconds from ``since_s`` to the last reading, on any replica, that was degraded
        (``degraded``) or not ready (otherwise); 0 if there was none."""
        bad = [
            r.at_s
            for r in self.readings
            if r.at_s >= since_s and (r.degraded > 0 if degraded else r.ready != 200)
        ]
        return max(bad) - since_s if bad else 0.0

    def seen(self, since_s: float, *, degraded: bool) -> bool:
        """Whether any replica was degraded (or not ready) after ``since_s``."""
        return self.span_s(since_s, degraded=degraded) > 0 or any(
            r.at_s >= since_s and (r.degraded > 0 if degraded else r.ready != 200)
            for r in self.readings
        )


def degraded_of(metrics_text: str) -> float:
    """The ``fleetgate_degraded`` gauge in a replica's /metrics text."""
    for line in metrics_text.splitlines():
        if line.startswith("fleetgate_degraded "):
            return float(line.split()[1])
    return 0.0
