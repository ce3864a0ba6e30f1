"""DistServe end to end: 2 Prefill + 2 Decode simulated nodes, 2 gateway replicas, one Redis,
the official openai SDK. The simulated engines count every session they allocate and free,
every connect and double connect, so a leak or a double free shows in their figures (the PD
state alone: tests/unit/test_pd_state.py)."""

from __future__ import annotations

import asyncio
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai import NOT_GIVEN, NotGiven
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from shared_state import PDState, Store
from tests.support import MODEL
from tests.support.clients import async_sdk
from tests.support.harness import RedisServer
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, ops

CHAT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "tell me a story about a very long prompt indeed"}
]
SIM = ("--tokens-per-s", "400", "--prefill-ms", "5", "--slots", "16")


@dataclass
class Fleet:
    redis_url: str
    prefill: list[SimNode]
    decode: list[SimNode]
    gateways: list[Gateway]

    def pd(self, node: SimNode) -> dict[str, Any]:
        stats = node.stats()["pd"]
        assert isinstance(stats, dict)
        return stats

    def total(self, nodes: list[SimNode], name: str) -> int:
        return sum(int(self.pd(n)[name]) for n in nodes if n.alive())

    def client(self, i: int = 0, timeout: float | NotGiven = NOT_GIVEN) -> openai.AsyncOpenAI:
        return async_sdk(self.gateways[i].url, timeout=timeout)


def register(gateway: Gateway, node: SimNode, role: int) -> None:
    """As ``lmdeploy serve api_server --role ... --proxy-url`` registers itself."""
    body = {"url": node.url, "status": {"models": [MODEL], "role": role}}
    httpx.post(f"{gateway.url}/nodes/add", json=body, timeout=10).raise_for_status()


async def post(
    url: str, json: object = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(url, json=json, headers=headers)


def metric(gateway: Gateway, name: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def start_fleet(
    procs: list[Process], redis_url: str, *gateway_flags: str, replicas: int = 2
) -> Fleet:
    # Started together, then waited for: their start-ups overlap.
    prefill = [
        SimNode(*SIM, "--role", "Prefill", name=f"prefill{i}", listening=False) for i in range(2)
    ]
    decode = [
        SimNode(*SIM, "--role", "Decode", name=f"decode{i}", listening=False) for i in range(2)
    ]
    procs.extend(prefill + decode)
    flags = ("--redis-url", redis_url, "--serving-strategy", "DistServe", *gateway_flags)
    gateways = [Gateway(*flags, name=f"pdgw{i}", listening=False) for i in range(replicas)]
    procs.extend(gateways)
    for process in prefill + decode + gateways:
        process.wait_listening()
    for node in prefill:
        register(gateways[0], node, 2)
    for node in decode:
        register(gateways[-1], node, 3)
    return Fleet(redis_url, prefill, decode, gateways)


@pytest.fixture
def fleet(procs: list[Process], redis_url: str) -> Iterator[Fleet]:
    yield start_fleet(procs, redis_url)


async def pd_state(redis_url: str) -> tuple[PDState, Store]:
    store = Store.open(redis_url, timeout_s=5.0)
    return PDState(store), store


async def no_sessions_left(fleet: Fleet) -> None:
    """Nothing held on any prefill node, nothing recorded in Redis."""
    pd, store = await pd_state(fleet.redis_url)
    try:

        async def settled() -> bool:
            held = fleet.total(fleet.prefill, "held")
            return held == 0 and not await pd.sessions()

        assert await eventually(settled, 15), [fleet.pd(n) for n in fleet.prefill]
    finally:
        await store.close()


class TestRequests:
    async def test_chat_and_completions_plain_and_streaming(self, fleet: Fleet) -> None:
        for i in range(2):
            client = fleet.client(i)
            chat = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
            assert chat.choices[0].message.content == "tok0 tok1 tok2 tok3 "
            text = await client.completions.create(model=MODEL, prompt="a b c", max_tokens=3)
            assert text.choices[0].text == "tok0 tok1 tok2 "
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=CHAT,
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
            parts = [c.choices[0].delta.content async for c in stream if c.choices]
            assert "".join(p or "" for p in parts) == "tok0 tok1 tok2 tok3 tok4 "
            text_stream = await client.completions.create(
                model=MODEL, prompt="x", max_tokens=2, stream=True
            )
            assert "".join([c.choices[0].text async for c in text_stream]) == "tok0 tok1 "
            await client.close()
        allocated = fleet.total(fleet.prefill, "allocated")
        assert allocated == 8  # one prefill session per request, none twice
        assert fleet.total(fleet.prefill, "freed_by_decode") == 8
        assert fleet.total(fleet.decode, "migrations") == 8
        for name in ("freed_by_proxy", "double_frees", "unknown_frees", "prefill_overruns"):
            assert fleet.total(fleet.prefill, name) == 0, name
        await no_sessions_left(fleet)

    async def test_each_pair_connected_once_across_replicas(self, fleet: Fleet) -> None:
        """A cold fleet hit by both replicas at once: every pair is connected exactly once."""
        clients = [fleet.client(0), fleet.client(1)]

        async def one(i: int) -> str | None:
            answer = await clients[i % 2].completions.create(model=MODEL, prompt="p", max_tokens=1)
            return answer.choices[0].text

        answers = await asyncio.gather(*(one(i) for i in range(60)))
        assert answers == ["tok0 "] * 60
        pd, store = await pd_state(fleet.redis_url)
        pairs = await pd.pairs()
        await store.close()
        # Both decode nodes were used from both prefill nodes (60 picks over 2 x 2).
        assert len(pairs) == 4
        for node in fleet.prefill + fleet.decode:
            stats = fleet.pd(node)
            assert stats["double_connects"] == 0, stats
            assert stats["connects"] == stats["initializes"] == 2, stats
        assert (
            metric(fleet.gateways[0], "fleetgate_distserve_pair_connects_total")
            + metric(fleet.gateways[1], "fleetgate_distserve_pair_connects_total")
            == 4
        )
        # A replica started now needs no warm-up: it finds the pairs connected.
        late = Gateway(
            "--redis-url", fleet.redis_url, "--serving-strategy", "DistServe", name="pdgw-late"
        )
        try:
            late_client = openai.AsyncOpenAI(base_url=f"{late.url}/v1", api_key="x", max_retries=0)
            for _ in range(8):
                await late_client.completions.create(model=MODEL, prompt="p", max_tokens=1)
            await late_client.close()
            assert metric(late, "fleetgate_distserve_pair_connects_total") == 0
        finally:
            late.close()
        assert sum(int(fleet.pd(n)["connects"]) for n in fleet.prefill) == 4
        for c in clients:
            await c.close()

    async def test_prefill_is_told_one_token_even_with_max_completion_tokens(
        self, fleet: Fleet
    ) -> None:
        """LMDeploy's proxy sets only max_tokens on completions: an engine that prefers
        max_completion_tokens then decodes the whole answer on the Prefill node."""
        client = fleet.client()
        text = await client.completions.create(
            model=MODEL, prompt="p", extra_body={"max_completion_tokens": 40}
        )
        assert text.choices[0].text.split() == [f"tok{i}" for i in range(40)]
        chat = await client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_completion_tokens=30,
        )
        assert len((chat.choices[0].message.content or "").split()) == 30
        assert fleet.total(fleet.prefill, "prefill_overruns") == 0
        assert fleet.total(fleet.prefill, "allocated") == 2
        await client.close()
        await no_sessions_left(fleet)

    async def test_n_above_one_is_refused(self, fleet: Fleet) -> None:
        client = fleet.client()
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=CHAT, n=2)
        assert "n > 1" in caught.value.message
        body = caught.value.body
        assert isinstance(body, dict) and body["param"] == "n"
        assert fleet.total(fleet.prefill, "allocated") == 0
        await client.close()

    async def test_prefill_failure_retries_another_prefill_node(self, fleet: Fleet) -> None:
        fleet.prefill[0].fault("status_503")
        client = fleet.client()
        for _ in range(6):
            answer = await client.completions.create(model=MODEL, prompt="p", max_tokens=2)
            assert answer.choices[0].text == "tok0 tok1 "
        assert fleet.pd(fleet.prefill[0])["allocated"] == 0
        assert fleet.pd(fleet.prefill[1])["allocated"] == 6
        await client.close()
        await no_sessions_left(fleet)

    async def test_decode_refusal_frees_the_session_and_retries(self, fleet: Fleet) -> None:
        fleet.decode[0].fault("status_503")
        client = fleet.client()
        for _ in range(8):
            answer = await client.completions.create(model=MODEL, prompt="p", max_tokens=2)
            assert answer.choices[0].text == "tok0 tok1 "
        refused = int(fleet.decode[0].stats()["requests_total"])
        assert refused >= 1  # the first request at least tried it
        assert fleet.total(fleet.prefill, "freed_by_proxy") == refused
        assert fleet.total(fleet.prefill, "freed_by_decode") == 8
        assert fleet.total(fleet.prefill, "allocated") == 8 + refused
        assert fleet.total(fleet.prefill, "double_frees") == 0
        await client.close()
        await no_sessions_left(fleet)

    async def test_decode_nodes_that_all_fail_give_a_502(self, fleet: Fleet) -> None:
        """Each decode node resets the connection: the client gets an OpenAI-shaped 502, and
        every prefill session is freed once (the sim resets before it migrates)."""
        for node in fleet.decode:
            node.fault("reset")
        client = fleet.client()
        with pytest.raises(openai.APIStatusError) as caught:
            await client.completions.create(model=MODEL, prompt="p", max_tokens=2)
        await client.close()
        assert caught.value.status_code == 502
        body = caught.value.body
        assert isinstance(body, dict) and body["type"] == "upstream_error"
        await no_sessions_left(fleet)
        attempts = fleet.total(fleet.prefill, "allocated")
        assert attempts == 3  # --max-attempts: a new prefill for each decode attempt
        assert fleet.total(fleet.prefill, "freed_by_proxy") == attempts
        assert fleet.total(fleet.prefill, "double_frees") == 0

    async def test_store_down_is_an_openai_error_and_allocates_nothing(
        self, procs: list[Process]
    ) -> None:
        server = RedisServer().start()
        try:
            fleet = start_fleet(procs, server.url, "--store-timeout", "0.2", replicas=1)
            client = fleet.client()
            await client.completions.create(model=MODEL, prompt="p", max_tokens=1)
            server.close()
            with pytest.raises(openai.APIStatusError) as caught:
                await client.completions.create(model=MODEL, prompt="p", max_tokens=1)
            await client.close()
        finally:
            server.close()
        assert caught.value.status_code == 503
        assert "store" in caught.value.message
        assert fleet.total(fleet.prefill, "allocated") == 1
        assert fleet.total(fleet.prefill, "held") == 0

    async def test_a_restarted_decode_engine(self, fleet: Fleet) -> None:
        """A Decode engine that lost its connections answers a stream's 200, then refuses the
        migration in an error event: the session is freed once. When it registers again its
        pairs are dropped, and the next request connects them anew."""
        gateway = fleet.gateways[0].url
        (await post(f"{gateway}/distserve/connection_warmup")).raise_for_status()
        decode = fleet.decode[0]
        (
            await post(f"{gateway}/nodes/remove", json={"url": fleet.decode[1].url})
        ).raise_for_status()
        for prefill in fleet.prefill:  # what a restart does to the engine
            body = {"engine_id": decode.url, "remote_engine_id": prefill.url}
            (await post(f"{decode.url}/distserve/p2p_drop_connect", json=body)).raise_for_status()
        client = fleet.client()
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=3,
            stream=True,
        )
        with pytest.raises(openai.APIError) as caught:
            async for _ in stream:
                pass
        assert "no connection" in str(caught.value)
        await no_sessions_left(fleet)
        assert fleet.total(fleet.prefill, "freed_by_proxy") == 1
        assert fleet.total(fleet.prefill, "double_frees") == 0
        register(fleet.gateways[1], decode, 3)  # the restarted engine announces itself
        answer = await client.completions.create(model=MODEL, prompt="p", max_tokens=2)
        assert answer.choices[0].text == "tok0 tok1 "
        await client.close()
        stats = fleet.pd(decode)
        assert stats["double_connects"] == 0 and stats["migrations"] == 1
        await no_sessions_left(fleet)

    async def test_no_decode_node_is_an_openai_error(self, fleet: Fleet) -> None:
        for node in fleet.decode:
            removed = await post(f"{fleet.gateways[0].url}/nodes/remove", json={"url": node.url})
            removed.raise_for_status()
        await asyncio.sleep(1.2)  # the other replica follows the registry within a second
        for i in range(2):
            client = fleet.client(i)
            with pytest.raises(openai.APIStatusError) as caught:
                await client.completions.create(model=MODEL, prompt="p", max_tokens=2)
            await client.close()
            assert caught.value.status_code == 503
            assert "Decode" in caught.value.message
        assert fleet.total(fleet.prefill, "double_frees") == 0
        await no_sessions_left(fleet)


async def _mixed_request(
    client: openai.AsyncOpenAI, i: int, rng: random.Random
) -> tuple[str, int | None]:
    """One request of the leak test: its kind and the status the client saw (None: left)."""
    chat = i % 2 == 0
    stream = rng.random() < 0.5
    leave = stream and rng.random() < 0.4  # disconnect mid-stream
    tokens = rng.randint(4, 40)
    kind = f"{'chat' if chat else 'text'}{'-stream' if stream else ''}"
    try:
        if stream:
            events: openai.AsyncStream[ChatCompletionChunk] | openai.AsyncStream[Completion]
            if chat:
                events = await client.chat.completions.create(
                    model=MODEL, messages=CHAT, max_tokens=tokens, stream=True
                )
            else:
                events = await client.completions.create(
                    model=MODEL, prompt="one two three", max_tokens=tokens, stream=True
                )
            seen = 0
            async for _ in events:
                seen += 1
                if leave and seen == 2:
                    await events.close()
                    return kind, None
        elif chat:
            await client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=tokens, stream=False
            )
        else:
            await client.completions.create(
                model=MODEL, prompt="one two three", max_tokens=tokens, stream=False
            )
        return kind, 200
    except openai.APIStatusError as exc:
        assert isinstance(exc.body, dict) and "message" in exc.body, exc
        return kind, exc.status_code
    except openai.APIError as exc:  # a stream cut by the killed node: an SSE error event
        assert "failed mid-stream" in str(exc) or "error" in str(exc).lower(), exc
        return kind, 0


class TestNoLeaks:
    async def test_200_mixed_requests_disconnects_and_a_killed_decode_node(
        self, fleet: Fleet
    ) -> None:
        """100 mixed requests with disconnects mid-stream, then 100 more during which a Decode
        node is killed. Every session is freed; the only second frees are of sessions whose
        decode node died holding the request, which fleetgate counts as uncertain."""
        rng = random.Random(8)
        clients = [fleet.client(0, timeout=30), fleet.client(1, timeout=30)]
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> tuple[str, int | None]:
            async with gate:
                return await _mixed_request(clients[i % 2], i, rng)

        async def kill_when_busy(node: SimNode) -> int:
            """SIGKILL the node once it has requests in flight; returns how many it had."""
            while True:
                stats = await asyncio.to_thread(node.stats)
                running = int(stats["running"])
                if running >= 2:
                    node.kill()
                    return running
                await asyncio.sleep(0.005)

        def figures() -> dict[str, int]:
            names = ("allocated", "freed_by_decode", "freed_by_proxy", "double_frees")
            return {n: fleet.total(fleet.prefill, n) for n in (*names, "unknown_frees", "held")}

        first = await asyncio.gather(*(one(i) for i in range(100)))
        assert [s for _, s in first].count(None) >= 10  # clients did leave mid-stream
        assert all(s in (200, None) for _, s in first), first
        await no_sessions_left(fleet)
        calm = figures()
        # Disconnects alone: each session freed exactly once.
        assert calm["allocated"] == calm["freed_by_decode"] + calm["freed_by_proxy"] >= 100
        assert calm["double_frees"] == calm["unknown_frees"] == 0

        killer = asyncio.ensure_future(kill_when_busy(fleet.decode[0]))
        second = await asyncio.gather(*(one(i) for i in range(100, 200)))
        in_flight_at_kill = await killer
        statuses = [status for _, status in first + second]
        assert not fleet.decode[0].alive()
        assert statuses.count(200) + statuses.count(None) >= 190, statuses
        assert all(s in (200, None, 0, 502, 503) for s in statuses), statuses
        await no_sessions_left(fleet)
        end = figures()
        uncertain = sum(
            metric(g, "fleetgate_distserve_uncertain_frees_total") for g in fleet.gateways
        )
        pairs = sum(int(fleet.pd(n)["connects"]) for n in fleet.prefill)
        print(
            f"leak test: first 100 {calm}; all 200 {end}, uncertain {uncertain:g}, "
            f"pairs connected {pairs}, "
            f"killed with {in_flight_at_kill} in flight"
        )
        # Nothing held, nothing unknown freed, every allocation freed.
        assert end["held"] == end["unknown_frees"] == 0
        assert end["allocated"] == end["freed_by_decode"] + end["freed_by_proxy"] >= 200
        # A second free only where the killed decode node may have migrated before dying.
        assert end["double_frees"] <= uncertain
        for c in clients:
            await c.close()

    async def test_a_killed_replica_leaves_no_session_held(
        self, procs: list[Process], redis_url: str
    ) -> None:
        fleet = start_fleet(procs, redis_url, "--lease-seconds", "1")
        for node in fleet.decode:
            node.fault("hang")  # the decode engines never schedule: sessions stay in migration
        doomed = fleet.client(0, timeout=30)
        calls = [
            asyncio.ensure_future(doomed.completions.create(model=MODEL, prompt="p", max_tokens=2))
            for _ in range(6)
        ]
        pd, store = await pd_state(redis_url)
        try:

            async def shelved() -> bool:
                sessions = await pd.sessions()
                return len(sessions) == 6 and all(s.decode for s in sessions)

            assert await eventually(shelved, 15)
            assert fleet.total(fleet.prefill, "held") == 6
            fleet.gateways[0].kill()
            # The other replica's upkeep takes the expired records and frees the sessions.
            await no_sessions_left(fleet)
            assert fleet.total(fleet.prefill, "freed_by_proxy") == 6
            assert fleet.total(fleet.prefill, "double_frees") == 0
            assert metric(fleet.gateways[1], "fleetgate_distserve_sessions_total") == 6
        finally:
            await store.close()
            for node in fleet.decode:
                node.fault("none")
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await doomed.close()


class TestOperations:
    async def test_connection_warmup(self, fleet: Fleet) -> None:
        url = f"{fleet.gateways[0].url}/distserve/connection_warmup"
        async with httpx.AsyncClient(timeout=30) as http:
            first, second = await asyncio.gather(http.post(url), http.post(url))
            assert first.status_code == second.status_code == 200
            counts = [first.json()["connected"], second.json()["connected"]]
            assert sum(counts) == 4  # two concurrent warm-ups connect each pair once
            again = (await http.post(f"{fleet.gateways[1].url}/distserve/connection_warmup")).json()
        assert again["already_connected"] == 4 and again["connected"] == 0
        assert {(p["prefill"], p["decode"]) for p in again["pairs"]} == {
            (p.url, d.url) for p in fleet.prefill for d in fleet.decode
        }
        for node in fleet.prefill + fleet.decode:
            assert fleet.pd(node)["double_connects"] == 0
        # Requests after the warm-up connect nothing more.
        client = fleet.client(1)
        for _ in range(6):
            await client.completions.create(model=MODEL, prompt="p", max_tokens=1)
        assert sum(int(fleet.pd(n)["connects"]) for n in fleet.prefill) == 4
        await client.close()

    async def test_warmup_reports_a_pair_that_cannot_connect(
        self, procs: list[Process], fleet: Fleet
    ) -> None:
        odd = SimNode(*SIM, "--role", "Decode", "--tp", "2", name="decode-tp2")
        procs.append(odd)
        register(fleet.gateways[0], odd, 3)
        response = await post(f"{fleet.gateways[0].url}/distserve/connection_warmup")
        assert response.status_code == 502
        body = response.json()
        assert body["failed"] == 2 and body["connected"] == 4
        assert body["error"]["code"] == "pair_connect_failed"
        failed = [p for p in body["pairs"] if p["status"] == "failed"]
        assert {p["decode"] for p in failed} == {odd.url}
        assert all("tensor-parallel" in p["detail"] for p in failed)

    async def test_gc_frees_orphaned_sessions(self, fleet: Fleet) -> None:
        pd, store = await pd_state(fleet.redis_url)
        prefill = fleet.prefill[0]
        try:
            # A replica that died right after its prefill: a held session, a record, no owner.
            for _ in range(3):
                _sid, answer = await prefill_session(pd, prefill, "replica-gone")
                assert answer["cache_block_ids"]
            async with httpx.AsyncClient(timeout=10) as http:
                assert fleet.pd(prefill)["held"] == 3
                # Live work is left alone.
                client = fleet.client()
                await client.completions.create(model=MODEL, prompt="p", max_tokens=1)
                report = (await http.post(f"{fleet.gateways[0].url}/distserve/gc")).json()
                await client.close()
        finally:
            await store.close()
        assert report == {
            "success": True,
            "expired": 0,
            "orphaned": 3,
            "freed": 3,
            "failed": 0,
            "in_migration": 0,
        }
        stats = fleet.pd(prefill)
        assert stats["held"] == 0 and stats["double_frees"] == 0 and stats["unknown_frees"] == 0

    async def test_endpoints_need_the_admin_key_and_distserve(
        self, procs: list[Process], redis_url: str
    ) -> None:
        secured = Gateway(
            "--redis-url", redis_url, "--serving-strategy", "DistServe", "--admin-key", "adm1n"
        )
        hybrid = Gateway("--redis-url", redis_url)
        procs.extend([secured, hybrid])
        for path in ("/distserve/connection_warmup", "/distserve/gc"):
            denied = await post(f"{secured.url}{path}")
            assert denied.status_code == 401 and "error" in denied.json()
            allowed = await post(f"{secured.url}{path}", headers={"authorization": "Bearer adm1n"})
            assert allowed.status_code == 200, allowed.text
            off = await post(f"{hybrid.url}{path}")
            assert off.status_code == 400 and "DistServe" in off.json()["error"]["message"]

    async def test_removing_a_decode_node_drops_its_pairs(self, fleet: Fleet) -> None:
        gateway = fleet.gateways[0]
        (await post(f"{gateway.url}/distserve/connection_warmup")).raise_for_status()
        gone = fleet.decode[0]
        removed = await post(f"{gateway.url}/nodes/remove", json={"url": gone.url})
        assert removed.json()["distserve"]["pairs_dropped"] == 2
        for node in fleet.prefill:
            stats = fleet.pd(node)
            assert gone.url not in stats["connected"]
            assert stats["drops"] == 1
        assert fleet.pd(gone)["connected"] == []
        pd, store = await pd_state(fleet.redis_url)
        assert {d for _, d in await pd.pairs()} == {fleet.decode[1].url}
        await store.close()

    async def test_checker_drops_the_pairs_of_a_dead_decode_node(
        self, procs: list[Process], fleet: Fleet
    ) -> None:
        (await post(f"{fleet.gateways[0].url}/distserve/connection_warmup")).raise_for_status()
        checker = start_checker(procs, fleet)
        dead = fleet.decode[1]
        prefill = fleet.prefill[0]
        pd, store = await pd_state(fleet.redis_url)
        try:
            # A session handed to the decode node that is about to die, still held.
            await hold_session_for(pd, prefill, dead)
            dead.kill()

            async def dropped() -> bool:
                return {d for _, d in await pd.pairs()} == {fleet.decode[0].url}

            assert await eventually(dropped, 20), checker.output()
            assert await pd.sessions() == []
        finally:
            await store.close()
        assert_dropped(fleet, prefill, dead)

    async def test_checker_drops_the_pairs_of_a_node_removed_by_the_ops_cli(
        self, procs: list[Process], fleet: Fleet
    ) -> None:
        """``fleetgate nodes remove`` writes Redis only; the checker notices the pairs and
        sessions of a node that left the registry and drops them like a deregistration."""
        (await post(f"{fleet.gateways[0].url}/distserve/connection_warmup")).raise_for_status()
        gone = fleet.decode[0]
        prefill = fleet.prefill[1]
        pd, store = await pd_state(fleet.redis_url)
        try:
            await hold_session_for(pd, prefill, gone)
            removed = ops(fleet.redis_url, "nodes", "remove", gone.url)
            assert removed.returncode == 0, removed.stderr
            checker = start_checker(procs, fleet)

            async def dropped() -> bool:
                return {d for _, d in await pd.pairs()} == {fleet.decode[1].url}

            assert await eventually(dropped, 20), checker.output()
            assert await pd.sessions() == []
        finally:
            await store.close()
        assert_dropped(fleet, prefill, gone)
        assert fleet.pd(gone)["connected"] == []  # alive: told to disconnect too
        # The nodes still registered keep their pairs, round after round.
        await asyncio.sleep(1.0)
        pd, store = await pd_state(fleet.redis_url)
        try:
            assert len(await pd.pairs()) == 2
        finally:
            await store.close()
        assert fleet.total(fleet.decode[1:], "drops") == 0


async def prefill_session(
    pd: PDState, prefill: SimNode, replica: str
) -> tuple[int, dict[str, Any]]:
    """A session opened for ``replica`` and prefilled on ``prefill``, its cache held; returns
    its id and the prefill node's answer."""
    sid = await pd.open_session(prefill.url, replica)
    body = {"model": MODEL, "prompt": "p", "max_tokens": 1, "max_completion_tokens": 1}
    body.update(with_cache=True, preserve_cache=True, session_id=sid)
    answer = await post(f"{prefill.url}/v1/completions", json=body)
    answer.raise_for_status()
    return sid, answer.json()


async def hold_session_for(pd: PDState, prefill: SimNode, decode: SimNode) -> None:
    """A session prefilled on ``prefill`` and handed to ``decode``, its cache still held."""
    sid, _answer = await prefill_session(pd, prefill, "some-replica")
    assert await pd.shelve(sid, decode.url) is True


def assert_dropped(fleet: Fleet, prefill: SimNode, gone: SimNode) -> None:
    """The session held on ``prefill`` was freed once; every prefill node dropped ``gone``."""
    stats = fleet.pd(prefill)
    assert stats["held"] == 0 and stats["freed_by_proxy"] == 1
    for node in fleet.prefill:
        stats = fleet.pd(node)
        assert gone.url not in stats["connected"]
        assert stats["drops"] == 1


def start_checker(procs: list[Process], fleet: Fleet) -> Process:
    """A health-checker probing every 0.2 s that deregisters after 0.5 s unhealthy."""
    argv = [sys.executable, "-m", "gateway.cli", "health-checker", "--redis-url", fleet.redis_url]
    argv += ["--interval", "0.2", "--fall", "1", "--deregister-after", "0.5"]
    checker = Process(argv, "pd-checker")
    procs.append(checker)
    return checker


async def test_dummy_prefill(procs: list[Process], redis_url: str) -> None:
    fleet = start_fleet(procs, redis_url, "--dummy-prefill", replicas=1)
    client = fleet.client()
    for stream in (False, True):
        if stream:
            events = await client.completions.create(
                model=MODEL, prompt="p", max_tokens=3, stream=True
            )
            text = "".join([c.choices[0].text async for c in events])
        else:
            answer = await client.completions.create(
                model=MODEL, prompt="p", max_tokens=3, stream=False
            )
            text = answer.choices[0].text
        assert text == "tok0 tok1 tok2 "
    await client.close()
    assert all(int(n.stats()["requests_total"]) == 0 for n in fleet.prefill)
    assert fleet.total(fleet.decode, "dummy_prefill") == 2
    assert fleet.total(fleet.decode, "connects") == 0
    pd, store = await pd_state(redis_url)
    assert await pd.pairs() == {} and await pd.sessions() == []
    await store.close()


def test_flags_are_lmdeploys(procs: list[Process], redis_url: str) -> None:
    gateway = Gateway(
        "--redis-url",
        redis_url,
        "--serving-strategy",
        "DistServe",
        "--migration-protocol",
        "NVLINK",
        "--link-type",
        "IB",
    )
    procs.append(gateway)
    decode = SimNode(*SIM, "--role", "Decode")
    prefill = SimNode(*SIM, "--role", "Prefill")
    procs.extend([decode, prefill])
    register(gateway, prefill, 2)
    register(gateway, decode, 3)
    answer = httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": MODEL, "prompt": "p", "max_tokens": 2},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    for node in (prefill, decode):
        stats = node.stats()["pd"]
        # LMDeploy's enum values: MigrationProtocol.NVLINK = 3, RDMALinkType.IB = 1.
        assert stats["last_init"] == {"protocol": 3, "link_type": 1}
    assert decode.stats()["pd"]["migrations"] == 1
