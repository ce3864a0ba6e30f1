"""A replica with ``--workers 2`` scraped as Prometheus does: whichever worker answers, one
scrape shows the sum over both workers, and no counter ever goes down; a worker that cannot
answer (stopped) counts with its last figures."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from pathlib import Path

import httpx

from tests.support import MODEL
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, children_of
from tests.support.prometheus import Sample, families, family_of, samples, total

REQUESTS = 200
SCRAPES = 50
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


async def send_requests(url: str, count: int, concurrency: int = 8) -> None:
    """``count`` chats, each on a new connection, so that both workers take some."""
    queue = list(range(count))
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=no_reuse, timeout=20) as http:

        async def work() -> None:
            while queue:
                queue.pop()
                answer = await http.post("/v1/chat/completions", json=CHAT)
                assert answer.status_code == 200, answer.text

        await asyncio.gather(*(work() for _ in range(concurrency)))


def scrape(url: str) -> tuple[dict[Sample, float], dict[str, str]]:
    """One scrape on a new connection (so it reaches either worker)."""
    answer = httpx.get(f"{url}/metrics", timeout=10)
    assert answer.status_code == 200
    return samples(answer.text), families(answer.text)


def assert_growing(history: list[dict[Sample, float]], kinds: dict[str, str]) -> None:
    """No counter or histogram series (bucket, sum, count) is lower than in an earlier scrape."""
    highest: dict[Sample, float] = {}
    for index, found in enumerate(history):
        for key, value in found.items():
            family = family_of(key[0], kinds)
            if family is None or kinds[family] not in ("counter", "histogram"):
                continue
            assert value >= highest.get(key, 0.0), f"scrape {index}: {key} fell to {value}"
            highest[key] = value
        missing = [k for k in highest if k not in found]
        assert not missing, f"scrape {index}: series gone: {missing}"


def worker_pids(gateway: Gateway) -> list[int]:
    """The gateway's worker processes, as their metrics sockets name them."""
    children = set(children_of(gateway.proc.pid))
    for folder in Path(tempfile.gettempdir()).glob("fleetgate-metrics-*"):
        pids = {int(p.stem) for p in folder.glob("*.sock")}
        if pids and pids <= children:
            return sorted(pids)
    raise AssertionError(f"no metrics folder of {sorted(children)}")


async def test_scrapes_sum_the_workers_and_counters_only_grow(
    redis_url: str, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    gateway = Gateway("--workers", "2", "--redis-url", redis_url, "--node", node.url)
    procs.append(gateway)
    gateway.wait_models(MODEL)

    async def both_workers_up() -> bool:
        async with httpx.AsyncClient() as http:
            replicas = (await http.get(f"{gateway.url}/nodes/replicas")).json()
        return bool(replicas["count"] == 2)

    assert await eventually(both_workers_up, 10)
    await send_requests(gateway.url, REQUESTS)

    history = []
    kinds: dict[str, str] = {}
    for _ in range(SCRAPES):
        found, kinds = scrape(gateway.url)
        history.append(found)
        assert total(found, "fleetgate_requests_total") == REQUESTS
        assert total(found, "fleetgate_request_duration_seconds_count") == REQUESTS
        assert found[("fleetgate_workers", frozenset({("figures", "live")}))] == 2
    assert_growing(history, kinds)
    assert kinds["fleetgate_requests_total"] == "counter"

    # A worker that cannot answer (stopped) counts with its last figures: nothing falls.
    pids = worker_pids(gateway)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGSTOP)
    try:
        for _ in range(3):
            found, kinds = scrape(gateway.url)
            history.append(found)
            assert total(found, "fleetgate_requests_total") == REQUESTS
            figures = {
                dict(labels)["figures"]: v
                for (name, labels), v in found.items()
                if name == "fleetgate_workers"
            }
            assert figures == {"live": 1, "last_known": 1}
    finally:
        os.kill(pids[0], signal.SIGCONT)
    await send_requests(gateway.url, 10)
    found, kinds = scrape(gateway.url)
    history.append(found)
    assert total(found, "fleetgate_requests_total") == REQUESTS + 10
    assert_growing(history, kinds)
