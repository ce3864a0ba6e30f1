"""The node API under attack, with real gateway replicas, a real Redis and real nodes on
loopback: node keys with CR/LF never reach a node, a self-registration changes nothing an
operator set and registers no other host, and admin bodies are bounded."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from tests.support import MODEL
from tests.support.clients import chat
from tests.support.openai_errors import assert_openai_error
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, ops

ADMIN = {"authorization": "Bearer adm"}
INJECTED_KEY = "k\r\nx-injected: 1"
NODE_KEY = "node-secret-0123456789"
ADMIN_BODY_MAX_BYTES = 1 << 20


def clean_env() -> dict[str, str]:
    """This environment without FLEETGATE_* variables: the test's flags are the only settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}


def replicas(procs: list[Process], redis_url: str, *flags: str, count: int = 2) -> list[Gateway]:
    started = [
        Gateway("--redis-url", redis_url, *flags, name="node-api", env=clean_env())
        for _ in range(count)
    ]
    procs += started
    return started


class RecordingNode:
    """A raw loopback TCP server standing for a node: it records every byte it receives and
    answers nothing, so a test sees exactly what the gateway sent it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = bytearray()
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(0.5)
                try:
                    while chunk := conn.recv(65536):
                        self.received += chunk
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def recording_node() -> Iterator[RecordingNode]:
    node = RecordingNode()
    yield node
    node.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def node_rows(redis_url: str) -> dict[str, dict[str, Any]]:
    """``fleetgate nodes list --json`` by URL: what an operator sees."""
    listing = ops(redis_url, "nodes", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    return {row["url"]: row for row in orjson.loads(listing.stdout)}


# -- node keys with CR/LF ------------------------------------------------------------------------


async def test_key_with_crlf_is_400_and_registers_nothing(
    redis_url: str, procs: list[Process], redis_client: aioredis.Redis
) -> None:
    (gateway,) = replicas(procs, redis_url, count=1)
    payload = {"url": "http://127.0.0.1:9", "status": {"models": [MODEL]}, "api_key": INJECTED_KEY}
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(f"{gateway.url}/nodes/add", json=payload)
    error = assert_openai_error(response, 400)
    assert "api_key" in error["message"]
    assert await redis_client.keys("*node*") == []
    assert node_rows(redis_url) == {}


async def test_key_with_crlf_in_the_store_never_reaches_the_node(
    redis_url: str,
    procs: list[Process],
    redis_client: aioredis.Redis,
    recording_node: RecordingNode,
) -> None:
    good = SimNode("--tokens-per-s", "inf")
    procs.append(good)
    for url, models in ((good.url, MODEL), (recording_node.url, MODEL)):
        added = ops(redis_url, "nodes", "add", url, "--model", models)
        assert added.returncode == 0, added.stderr
    alone = ops(redis_url, "nodes", "add", recording_node.url, "--model", MODEL, "--model", "lone")
    assert alone.returncode == 0, alone.stderr
    # A raw write, as a careless ops tool might do, bypassing the registry's validation.
    (node_key,) = [k for k in await redis_client.keys("*:node:*") if recording_node.url in k]
    smuggled = INJECTED_KEY + "\r\n\r\nGET /second HTTP/1.1\r\nhost: x"
    await redis_client.hset(node_key, "api_key", smuggled)
    await redis_client.incr(next(k for k in await redis_client.keys("*:epoch")))

    gateways = replicas(procs, redis_url, "--strategy", "round_robin")
    async with httpx.AsyncClient(timeout=10) as http:
        served = []
        for i in range(8):  # round robin: the keyed node is the first pick of half of them
            response = await chat(http, gateways[i % 2].url, None)
            assert response.status_code == 200, response.text
            served.append(response.headers["x-fleetgate-node"])
        assert set(served) == {good.url}
        # The node alone for a model: the client gets a clean error, no traceback.
        lone = await http.post(
            f"{gateways[0].url}/v1/chat/completions",
            json={"model": "lone", "messages": [], "max_tokens": 1},
        )
        error = assert_openai_error(lone, 502)
        assert "api_key" in error["message"] and "\r" not in error["message"]
    assert b"x-injected" not in bytes(recording_node.received).lower()
    assert b"/second" not in bytes(recording_node.received)
    assert recording_node.received == b"" and recording_node.connections == 0


# -- self-registration -----------------------------------------------------------------------------


async def test_self_registration_keeps_what_the_operator_set(
    redis_url: str, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "inf", "--api-key", NODE_KEY)
    procs.append(node)
    first, second = replicas(
        procs, redis_url, "--admin-key", "adm", "--register-allow", "127.0.0.0/8"
    )
    lmdeploy = {"url": f"http://0.0.0.0:{node.port}", "status": {"models": [MODEL], "role": 1}}
    async with httpx.AsyncClient(timeout=10) as http:
        # The node registers itself first, as api_server --proxy-url does at start.
        response = await http.post(f"{first.url}/nodes/add", json=lmdeploy)
        assert response.status_code == 200 and response.json()["created"] is True, response.text
        flags = ("--weight", "3", "--speed", "2", "--api-key", NODE_KEY)
        assert ops(redis_url, "nodes", "set", node.url, *flags).returncode == 0
        assert ops(redis_url, "nodes", "drain", node.url, "--no-wait").returncode == 0
        before = node_rows(redis_url)[node.url]

        # A restart: the same payload, through the other replica, with a new model.
        restarted = {**lmdeploy, "status": {"models": [MODEL, "new-model"], "role": 1}}
        response = await http.post(f"{second.url}/nodes/add", json=restarted)
        assert response.status_code == 200 and response.json()["created"] is False, response.text
        after = node_rows(redis_url)[node.url]
        assert after["models"] == [MODEL, "new-model"]
        kept = ("state", "weight", "speed", "api_key", "reason")
        assert {k: after[k] for k in kept} == {k: before[k] for k in kept}
        assert (after["state"], after["weight"], after["speed"]) == ("draining", 3.0, 2.0)

        # Operator fields are an admin's: a self-registration carrying one is refused whole.
        for extra in ({"api_key": ""}, {"weight": 100}, {"insecure": True}):
            response = await http.post(f"{second.url}/nodes/add", json={**lmdeploy, **extra})
            assert_openai_error(response, 403, "forbidden")
        assert node_rows(redis_url)[node.url] == after

        # The node key is still the operator's: once back in rotation, the node serves.
        assert ops(redis_url, "nodes", "set", node.url, "--state", "active").returncode == 0

        async def served_everywhere() -> bool:
            answers = [await chat(http, g.url, None) for g in (first, second)]
            return all(a.status_code == 200 for a in answers)

        assert await eventually(served_everywhere, 5)

        # An admin keeps full control: its fields are applied, the state still is not.
        admin = {**lmdeploy, "weight": 5, "api_key": NODE_KEY}
        response = await http.post(f"{first.url}/nodes/add", json=admin, headers=ADMIN)
        assert response.status_code == 200, response.text
        row = node_rows(redis_url)[node.url]
        assert (row["weight"], row["speed"], row["state"]) == (5.0, 2.0, "active")


async def test_allowed_host_cannot_register_another_host(
    redis_url: str, procs: list[Process], redis_client: aioredis.Redis
) -> None:
    first, second = replicas(
        procs, redis_url, "--admin-key", "adm", "--register-allow", "127.0.0.0/8"
    )
    other = "http://127.0.0.2:9"  # another address, even on this machine
    async with httpx.AsyncClient(timeout=10) as http:
        operator = {"url": other, "status": {"models": ["other-model"]}, "weight": 2}
        response = await http.post(f"{first.url}/nodes/add", json=operator, headers=ADMIN)
        assert response.status_code == 200, response.text
        assert ops(redis_url, "nodes", "drain", other, "--no-wait").returncode == 0
        keys_before = sorted(str(k) for k in await redis_client.keys("*"))
        node_key = next(k for k in keys_before if k.endswith(f":node:{other}"))
        node_before = await redis_client.hgetall(node_key)
        epoch_key = next(k for k in keys_before if k.endswith(":epoch"))
        epoch_before = await redis_client.get(epoch_key)

        # From 127.0.0.1, inside --register-allow, without a key: only its own address.
        targets = [
            other,  # a known node of another host: its models would be rewritten
            "http://10.1.2.3:23333",  # a new node elsewhere
            "http://[::2]:6379",  # a Redis port elsewhere
            "http://no-such-host.invalid:80",  # cannot be resolved, cannot be checked
        ]
        for gateway in (first, second):
            for url in targets:
                hijack = {"url": url, "status": {"models": ["stolen"], "role": 1}}
                response = await http.post(f"{gateway.url}/nodes/add", json=hijack)
                error = assert_openai_error(response, 403, "forbidden")
                assert error["param"] == "url"
        assert sorted(str(k) for k in await redis_client.keys("*")) == keys_before
        assert await redis_client.hgetall(node_key) == node_before
        assert await redis_client.get(epoch_key) == epoch_before

    # The same host registers itself (a node on 127.0.0.2 calling from it) and keeps the drain.
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(timeout=10, transport=transport) as own:
        again = {"url": other, "status": {"models": ["other-model", "more"], "role": 1}}
        response = await own.post(f"{second.url}/nodes/add", json=again)
        assert response.status_code == 200, response.text
    row = node_rows(redis_url)[other]
    assert (row["models"], row["state"], row["weight"]) == (["other-model", "more"], "draining", 2)


def test_nodes_add_of_a_known_node_changes_only_what_is_given(redis_url: str) -> None:
    url = "http://127.0.0.1:9"
    first = ("nodes", "add", url, "--model", MODEL, "--weight", "3", "--api-key", NODE_KEY)
    assert ops(redis_url, *first).returncode == 0
    assert ops(redis_url, "nodes", "drain", url, "--no-wait").returncode == 0
    again = ops(redis_url, "nodes", "add", url, "--model", MODEL, "--model", "second")
    assert again.returncode == 0 and f"{url}: updated" in again.stdout, again.stderr
    row = node_rows(redis_url)[url]
    assert (row["models"], row["state"], row["weight"], row["api_key"]) == (
        [MODEL, "second"],
        "draining",
        3.0,
        True,
    )
    assert ops(redis_url, "nodes", "add", url, "--model", MODEL, "--weight", "4").returncode == 0
    row = node_rows(redis_url)[url]
    assert (row["models"], row["state"], row["weight"], row["api_key"]) == (
        [MODEL],
        "draining",
        4.0,
        True,
    )


# -- bounded admin bodies --------------------------------------------------------------------------


def raw_post(port: int, path: str, head: bytes, body: bytes = b"") -> bytes:
    """POST ``body`` after ``head`` (extra header lines) on a fresh connection; the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: gw\r\n".encode()
            + head
            + b"Content-Type: application/json\r\nConnection: close\r\n\r\n"
        )
        try:
            sock.sendall(body)
        except OSError:
            pass  # the gateway answered and closed before taking it all
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return data


def assert_raw_413(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"content-type: application/json" in head.lower()
    error = orjson.loads(body)["error"]
    assert error["code"] == "request_too_large" and set(error) == {
        "message",
        "type",
        "param",
        "code",
    }


def chunked(payload: bytes, size: int = 64 * 1024) -> bytes:
    parts = [payload[i : i + size] for i in range(0, len(payload), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def test_admin_bodies_are_bounded(
    redis_url: str, procs: list[Process], redis_client: aioredis.Redis
) -> None:
    (hybrid,) = replicas(procs, redis_url, count=1)
    (distserve,) = replicas(procs, redis_url, "--serving-strategy", "DistServe", count=1)
    paths = [
        (hybrid, "/nodes/add"),
        (hybrid, "/nodes/remove"),
        (hybrid, "/nodes/drain"),
        (hybrid, "/nodes/terminate"),
        (distserve, "/distserve/gc"),
        (distserve, "/distserve/connection_warmup"),
    ]
    big = b'{"url": "http://127.0.0.1:9", "pad": "' + b"x" * (ADMIN_BODY_MAX_BYTES + 512) + b'"}'
    for gateway, path in paths:
        # 60 MB declared: refused before a byte of it is sent.
        assert_raw_413(raw_post(gateway.port, path, b"Content-Length: 60000000\r\n"))
        # No length declared: refused once the bytes counted pass the bound.
        assert_raw_413(
            raw_post(gateway.port, path, b"Transfer-Encoding: chunked\r\n", chunked(big))
        )
    assert node_rows(redis_url) == {}

    async with httpx.AsyncClient(timeout=30) as http:
        # Under the bound, a padded body is an ordinary registration.
        padded = {"url": "http://127.0.0.1:9", "status": {"models": [MODEL]}, "pad": "x" * 900_000}
        response = await http.post(f"{hybrid.url}/nodes/add", json=padded)
        assert response.status_code == 200, response.text
        # 20,000 models fit in the bound but not in a node: a clear 400, nothing changed.
        many = [f"model-{i}" for i in range(20_000)]
        for url in ("http://127.0.0.1:9", "http://127.0.0.1:10"):
            huge = {"url": url, "status": {"models": many}}
            error = assert_openai_error(await http.post(f"{hybrid.url}/nodes/add", json=huge), 400)
            assert "4096" in error["message"]
    assert {url: row["models"] for url, row in node_rows(redis_url).items()} == {
        "http://127.0.0.1:9": [MODEL]
    }
