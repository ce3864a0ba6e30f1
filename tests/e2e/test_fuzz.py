"""Fuzzing the replica's public surface with hypothesis, against a real replica on a real Redis
with simulated nodes: generated request bodies (valid, malformed, deep, huge numbers, odd
unicode, wrong types), headers with odd bytes, Content-Length values on a raw socket, and
node-API payloads; request bodies again through a DistServe replica.

Whatever comes in: never a 500 of the replica's own (a node's 500 is relayed, naming the node),
never a traceback in the replica's log, an OpenAI-shaped error body for every 4xx and 5xx the
replica answers, and a refused node-API call leaves the registry as it was. Bounded: a fixed
number of examples per property, derandomized (a failure reproduces as is), no deadline; named
findings are ``@example`` rows or tests of their own. To hunt further, ``FUZZ_EXAMPLES=3000``
runs that many examples per property with fresh random data.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support import MODEL
from tests.support.harness import RedisServer
from tests.support.openai_errors import assert_openai_error
from tests.support.processes import Gateway, Process, SimNode

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize="FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
NODE_PATHS = ("/nodes/add", "/nodes/remove", "/nodes/drain")
RAW_TIMEOUT_S = 10.0


@dataclass
class Fleet:
    """A replica and its simulated nodes, kept for the whole module, and what it answered."""

    gateway: Gateway
    nodes: list[SimNode]
    http: httpx.Client
    seen: int = 0  # how much of the replica's log has been checked
    statuses: dict[int, int] = field(default_factory=dict)

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def assert_no_traceback(self) -> None:
        """Nothing the replica logged since the last check is a traceback."""
        output = self.gateway.output()
        fresh, self.seen = output[self.seen :], len(output)
        assert "Traceback" not in fresh, fresh[-4000:]

    def status(self) -> Any:
        response = self.http.get(f"{self.gateway.url}/nodes/status")
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer) -> Iterator[Fleet]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    started: list[Process] = []
    try:
        nodes = [SimNode("--tokens-per-s", "inf") for _ in range(2)]
        started += nodes
        flags = ["--redis-url", redis_server.url, "--body-timeout", "2", "--access-log", "false"]
        for node in nodes:
            flags += ["--node", node.url]
        gateway = Gateway(*flags, name="fuzz")
        started.append(gateway)
        gateway.wait_models(MODEL)
        with httpx.Client(timeout=30) as http:
            fleet = Fleet(gateway, nodes, http)
            yield fleet
            # Whatever was thrown at it, the replica holds no lease afterwards.
            leases = {url: entry["unfinished"] for url, entry in fleet.status().items()}
            assert not any(leases.values()), leases
        print(f"fuzz answers by status: {dict(sorted(fleet.statuses.items()))}")
    finally:
        for proc in reversed(started):
            proc.close()


@pytest.fixture(scope="module")
def pd_fleet(redis_server: RedisServer, fleet: Fleet) -> Iterator[Fleet]:
    """A DistServe replica with a Prefill and a Decode node, beside the Hybrid fleet."""
    started: list[Process] = []
    try:
        prefill = SimNode("--role", "Prefill", "--tokens-per-s", "inf", name="fuzz-prefill")
        decode = SimNode("--role", "Decode", "--tokens-per-s", "inf", name="fuzz-decode")
        started += [prefill, decode]
        flags = ["--redis-url", redis_server.url, "--prefix", "fuzzpd", "--access-log", "false"]
        gateway = Gateway(*flags, "--serving-strategy", "DistServe", name="fuzz-pd")
        started.append(gateway)
        with httpx.Client(timeout=30) as http:
            for node, role in ((prefill, 2), (decode, 3)):
                body = {"url": node.url, "status": {"models": [MODEL], "role": role}}
                added = http.post(f"{gateway.url}/nodes/add", json=body)
                assert added.status_code == 200, added.text
            yield Fleet(gateway, [prefill, decode], http)
    finally:
        for proc in reversed(started):
            proc.close()


def check_answer(fleet: Fleet, response: httpx.Response) -> None:
    """Never a 500 of the replica's own (a node's 500 is relayed, naming the node); every error
    OpenAI-shaped; nothing logged as a traceback."""
    status = response.status_code
    fleet.count(status)
    # The simulated node's JSON library writes 254 levels at most: deeper, it answers 500.
    assert status != 500 or "x-fleetgate-node" in response.headers, response.text
    if status >= 400:
        assert_openai_error(response, status)
    fleet.assert_no_traceback()


# -- what is generated ------------------------------------------------------------------------

# JSON leaves, huge numbers and odd unicode included (lone surrogates, NUL, RTL marks).
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["\ud800", "\x00", "\u202e", "\uffff", "😀" * 3, MODEL])
)
json_values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
small_counts = st.integers(min_value=0, max_value=3)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=30)}
    ),
    max_size=3,
)
# Each field either plausible or anything at all; counts are kept small when they are numbers,
# so a valid request never asks a node for a million tokens.
request_fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.just(MODEL) | json_values,
        "stream": st.booleans() | json_values,
        "messages": messages | json_values,
        "prompt": st.text(max_size=30) | json_values,
        "input": st.text(max_size=30) | json_values,
        "max_tokens": small_counts | leaves.filter(lambda v: not isinstance(v, int)),
        "n": small_counts | leaves.filter(lambda v: not isinstance(v, int)),
        "user": st.text(max_size=30) | json_values,
    },
)


def encode(value: object, ascii_only: bool) -> bytes:
    """JSON text of ``value``; lone surrogates kept as invalid UTF-8 when not escaped."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def deep(depth: int) -> bytes:
    return b'{"model":"%s","messages":%s%s}' % (MODEL.encode(), b"[" * depth, b"]" * depth)


bodies = (
    st.builds(encode, request_fields, st.booleans())
    | st.builds(encode, json_values, st.booleans())
    | st.binary(max_size=64)
    | st.builds(deep, st.integers(min_value=1, max_value=5_000))
    | st.sampled_from(
        [
            b'{"model":"%s","max_tokens":1e999999}' % MODEL.encode(),
            b'{"model":"%s","max_tokens":%s}' % (MODEL.encode(), b"9" * 5000),
            b'{"model":"%s","stream":true,"max_tokens":-0.0e-999}' % MODEL.encode(),
            b'{"model":"\\ud800"}',
            b'{"model":"%s","user":"\\udfff\\u0000"}' % MODEL.encode(),
        ]
    )
)


def header_value(raw: bytes) -> bytes:
    """``raw`` as a header value an HTTP/1.1 client can send: visible bytes and inner spaces."""
    kept = bytes(b for b in raw if b == 9 or 0x20 <= b <= 0x7E or b >= 0x80)
    return kept.strip(b" \t")


odd_values = st.builds(header_value, st.binary(max_size=80))
content_types = st.sampled_from(
    [b"application/json", b"APPLICATION/JSON; charset=utf-8", b"text/plain", b"", b";", b"+json"]
) | st.builds(header_value, st.binary(max_size=30))


# -- the properties ---------------------------------------------------------------------------


@FUZZ
@given(path=st.sampled_from(PATHS), body=bodies)
@example(path=PATHS[0], body=deep(1_000))  # was a 500 and a traceback (msgspec RecursionError)
@example(path=PATHS[0], body=deep(100_000))
def test_request_bodies(fleet: Fleet, path: str, body: bytes) -> None:
    response = fleet.http.post(
        f"{fleet.gateway.url}{path}", content=body, headers={"content-type": "application/json"}
    )
    check_answer(fleet, response)


@FUZZ
@given(path=st.sampled_from(PATHS), body=bodies)
@example(path=PATHS[0], body=deep(300))  # DistServe re-encodes: was a 500 past 254 levels
@example(path=PATHS[0], body=b'{"model":"%s","temperature":1e400}' % MODEL.encode())  # was a 500
def test_distserve_request_bodies(pd_fleet: Fleet, path: str, body: bytes) -> None:
    response = pd_fleet.http.post(
        f"{pd_fleet.gateway.url}{path}", content=body, headers={"content-type": "application/json"}
    )
    check_answer(pd_fleet, response)


@FUZZ
@given(
    content_type=content_types,
    authorization=odd_values,
    request_id=odd_values,
    session_id=odd_values,
    stream=st.booleans(),
)
def test_request_headers(
    fleet: Fleet,
    content_type: bytes,
    authorization: bytes,
    request_id: bytes,
    session_id: bytes,
    stream: bool,
) -> None:
    body = encode({"model": MODEL, "messages": [], "max_tokens": 2, "stream": stream}, True)
    headers = {
        b"content-type": content_type,
        b"authorization": header_value(b"Bearer " + authorization),
        b"x-request-id": request_id,
        b"x-session-id": session_id,
    }
    response = fleet.http.post(
        f"{fleet.gateway.url}/v1/chat/completions", content=body, headers=headers
    )
    check_answer(fleet, response)
    echoed = response.headers.get("x-request-id", "")
    assert echoed and "\r" not in echoed and "\n" not in echoed


def read_first_response(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


@FUZZ
@given(
    length=st.sampled_from([b"-1", b"abc", b"1,1", b"0x10", b"99999999999999999999", b"", b"+5"])
    | st.builds(lambda n: str(n).encode(), st.integers(min_value=0, max_value=200))
    | st.builds(header_value, st.binary(max_size=12)),
    body=st.builds(encode, request_fields, st.just(True)) | st.binary(max_size=64),
)
def test_content_length(fleet: Fleet, length: bytes, body: bytes) -> None:
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\nconnection: close\r\n"
        b"content-length: %s\r\n\r\n%s" % (length, body)
    )
    with socket.create_connection(("127.0.0.1", fleet.gateway.port), timeout=RAW_TIMEOUT_S) as sock:
        sock.settimeout(RAW_TIMEOUT_S)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # a body shorter than declared ends here
        answer = read_first_response(sock)
    if not answer:
        fleet.assert_no_traceback()
        return  # the client left before its body was whole: nobody to answer
    head, _, rest = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in header_lines)
    }
    fleet.count(status)
    assert status != 500, answer
    if status >= 400 and "x-request-id" in headers:  # answered by the replica, not by h11
        response = httpx.Response(
            status, headers=headers, content=rest[: int(headers["content-length"])]
        )
        assert_openai_error(response, status)
    fleet.assert_no_traceback()


node_urls = (
    st.sampled_from(
        [
            "http://127.0.0.1:9",
            "http://0.0.0.0:9/",
            "127.0.0.1:9",
            "http://127.0.0.1:9/\r\nx: y",
            "http://[::1]:9",
            "ftp://127.0.0.1:9",
            "http://127.0.0.1:99999",
            "",
        ]
    )
    | st.builds(lambda tail: f"http://127.0.0.1:9/{tail}", st.text(max_size=20))
    | leaves.filter(lambda v: not isinstance(v, str))
)
node_payloads = (
    st.fixed_dictionaries(
        {},
        optional={
            "url": node_urls,
            "status": st.fixed_dictionaries(
                {},
                optional={
                    "models": st.lists(st.text(max_size=10), max_size=3) | json_values,
                    "role": st.sampled_from([1, 2, 3, "Hybrid", "Prefill"]) | json_values,
                },
            )
            | json_values,
            "api_key": st.text(max_size=20) | json_values,
            "weight": leaves,
            "speed": leaves,
            "insecure": leaves,
        },
    )
    | json_values
)


@FUZZ
@given(path=st.sampled_from(NODE_PATHS), payload=node_payloads, ascii_only=st.booleans())
def test_node_api(fleet: Fleet, path: str, payload: object, ascii_only: bool) -> None:
    before = fleet.status()
    response = fleet.http.post(
        f"{fleet.gateway.url}{path}",
        content=encode(payload, ascii_only),
        headers={"content-type": "application/json"},
    )
    check_answer(fleet, response)
    after = fleet.status()
    if response.status_code >= 400:
        assert after == before, (response.text, before, after)
        return
    # Accepted: put the fleet back as it was, so that every example starts alike.
    ours = {node.url for node in fleet.nodes}
    for url in set(after) - ours:
        fleet.http.post(f"{fleet.gateway.url}/nodes/remove", json={"url": url})
    assert set(fleet.status()) == ours
