"""Hostile input on the request path, end to end through a real replica on a real Redis: a
client's ``X-Request-ID`` shared by several requests, JSON nested too deeply, a body trickled
in slowly, and a request framed both by Content-Length and by Transfer-Encoding (smuggling)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import httpx
import orjson
import pytest

from tests.support import MODEL
from tests.support.openai_errors import assert_openai_error, assert_openai_error_body
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, ops, together

KEY = "key-input-0123456789abcdef"
SHARED_ID = "same-id-for-all"
RAW_TIMEOUT_S = 10.0  # a raw-socket read that takes longer means the gateway never answered


def start(procs: list[Process], redis_url: str, *flags: str, nodes: int = 1) -> Gateway:
    """``nodes`` slow simulated nodes (20 tokens/s) and one replica on them, ready."""
    sims = together(procs, [SimNode("--tokens-per-s", "20", listening=False) for _ in range(nodes)])
    args = ["--redis-url", redis_url, *flags]
    for sim in sims:
        args += ["--node", sim.url]
    gateway = Gateway(*args)
    procs.append(gateway)
    gateway.wait_models(MODEL)
    return gateway


async def unfinished(http: httpx.AsyncClient, gateway: Gateway) -> int:
    """The fleet's requests in flight (leases in force), as ``/nodes/status`` shows them."""
    # The test's key may read the status once the replica is closed by it.
    auth = {"authorization": f"Bearer {KEY}"}
    status = (await http.get(f"{gateway.url}/nodes/status", headers=auth)).json()
    return sum(int(entry["unfinished"]) for entry in status.values())


def add_key(redis_url: str, concurrency: int) -> None:
    added = ops(redis_url, "keys", "add", "input", "--key", KEY, "--concurrency", str(concurrency))
    assert added.returncode == 0, added.stderr


async def wait_keys_known(http: httpx.AsyncClient, gateway: Gateway) -> None:
    """Wait until the replica knows the stored key: a request without one is refused."""

    async def closed() -> bool:
        answer = await http.post(
            f"{gateway.url}/v1/chat/completions", json={"model": MODEL, "messages": []}
        )
        return answer.status_code == 401

    assert await eventually(closed, 5)


def assert_clean_log(gateway: Gateway) -> None:
    output = gateway.output()
    assert "Traceback" not in output, output[-3000:]


# -- X-Request-ID ---------------------------------------------------------------------------


async def test_requests_sharing_an_x_request_id_hold_a_lease_and_a_key_slot_each(
    redis_url: str, procs: list[Process]
) -> None:
    gateway = start(procs, redis_url, nodes=2)
    headers = {"x-request-id": SHARED_ID}
    body = {"model": MODEL, "messages": [], "max_tokens": 40, "stream": True}
    async with httpx.AsyncClient(timeout=30) as http:

        async def no_lease() -> bool:
            return await unfinished(http, gateway) == 0

        url = f"{gateway.url}/v1/chat/completions"
        streams = [http.stream("POST", url, json=body, headers=headers) for _ in range(4)]
        responses = await asyncio.gather(*(s.__aenter__() for s in streams))
        try:
            assert [r.status_code for r in responses] == [200] * 4
            assert {r.headers["x-request-id"] for r in responses} == {SHARED_ID}
            # Four requests in flight, whatever id the client gave them: four leases.
            assert await unfinished(http, gateway) == 4
        finally:
            for stream in streams:
                await stream.__aexit__(None, None, None)
        assert await eventually(no_lease, 5)

        # A key allowed two concurrent requests refuses the third, same id or not.
        add_key(redis_url, 2)
        await wait_keys_known(http, gateway)
        keyed = {**headers, "authorization": f"Bearer {KEY}"}
        held = [http.stream("POST", url, json=body, headers=keyed) for _ in range(2)]
        first_two = await asyncio.gather(*(s.__aenter__() for s in held))
        try:
            assert [r.status_code for r in first_two] == [200, 200]
            third = await http.post(url, json={**body, "stream": False}, headers=keyed)
            assert_openai_error(third, 429, "concurrency_limit_exceeded")
        finally:
            for stream in held:
                await stream.__aexit__(None, None, None)
        assert await eventually(no_lease, 5)
        again = await http.post(url, json={**body, "stream": False}, headers=keyed)
        assert again.status_code == 200, again.text
    assert_clean_log(gateway)


# -- JSON nested too deeply -----------------------------------------------------------------


def nested(depth: int) -> bytes:
    """A chat request whose ``messages`` holds lists ``depth`` levels deep."""
    return b'{"model":"%s","messages":%s%s}' % (MODEL.encode(), b"[" * depth, b"]" * depth)


async def test_deeply_nested_json_is_a_400_not_a_500(redis_url: str, procs: list[Process]) -> None:
    gateway = start(procs, redis_url)
    json_type = {"content-type": "application/json"}
    async with httpx.AsyncClient(timeout=30) as http:
        for depth in (1_000, 5_000, 100_000):
            answer = await http.post(
                f"{gateway.url}/v1/chat/completions", content=nested(depth), headers=json_type
            )
            error = assert_openai_error(answer, 400, "invalid_json")
            assert error["type"] == "invalid_request_error"
            assert "nested too deeply" in error["message"]
        for path in ("/nodes/add", "/nodes/remove", "/nodes/drain"):
            before = (await http.get(f"{gateway.url}/nodes/status")).json()
            for depth in (1_000, 100_000):
                deep = b'{"url":' + b"[" * depth + b"]" * depth + b"}"
                answer = await http.post(f"{gateway.url}{path}", content=deep, headers=json_type)
                assert_openai_error(answer, 400)
            assert (await http.get(f"{gateway.url}/nodes/status")).json() == before
        # The replica still serves.
        fine = await http.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": MODEL, "messages": [], "max_tokens": 1},
        )
        assert fine.status_code == 200, fine.text
    assert_clean_log(gateway)


async def test_distserve_refuses_what_it_cannot_re_encode_with_a_400(
    redis_url: str, procs: list[Process]
) -> None:
    """DistServe decodes the request again (orjson) and re-encodes it for both nodes: JSON the
    first decoder let in but orjson refuses, or nests deeper than it writes, is a 400."""
    prefill = SimNode("--role", "Prefill", name="prefill")
    decode = SimNode("--role", "Decode", name="decode")
    procs += [prefill, decode]
    gateway = Gateway("--redis-url", redis_url, "--serving-strategy", "DistServe")
    procs.append(gateway)
    async with httpx.AsyncClient(timeout=30) as http:
        for node, role in ((prefill, 2), (decode, 3)):
            body = {"url": node.url, "status": {"models": [MODEL], "role": role}}
            added = await http.post(f"{gateway.url}/nodes/add", json=body)
            assert added.status_code == 200, added.text
        url = f"{gateway.url}/v1/chat/completions"
        json_type = {"content-type": "application/json"}
        refused = [
            nested(300),  # past orjson's 254 levels when re-encoded
            nested(129),  # past the gateway's own limit of 128
            b'{"model":"%s","messages":[],"temperature":1e400}' % MODEL.encode(),
            b'{"model":"%s","messages":[],"user":"\\ud800"}' % MODEL.encode(),
        ]
        for payload in refused:
            answer = await http.post(url, content=payload, headers=json_type)
            error = assert_openai_error(answer, 400, "invalid_json")
            assert error["type"] == "invalid_request_error"
        for depth in (1, 120):
            served = await http.post(url, content=nested(depth), headers=json_type)
            assert served.status_code == 200, served.text
    assert_clean_log(gateway)


# -- raw sockets ------------------------------------------------------------------------------


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length from ``sock``: status, headers, body.
    ``buffer`` keeps what arrived beyond it."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response: {bytes(buffer)!r}")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = bytearray(rest)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a response body")
        body += chunk
    buffer[:] = body[length:]
    return status, headers, bytes(body[:length])


def read_until_closed(sock: socket.socket, buffer: bytearray) -> bytes:
    """Everything the server still sends before it closes the connection."""
    while chunk := sock.recv(65536):
        buffer += chunk
    return bytes(buffer)


def connect(gateway: Gateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=RAW_TIMEOUT_S)
    sock.settimeout(RAW_TIMEOUT_S)
    return sock


async def test_a_body_trickled_in_gets_408_and_frees_the_key_slot(
    redis_url: str, procs: list[Process]
) -> None:
    gateway = start(procs, redis_url, "--body-timeout", "0.5")
    add_key(redis_url, 1)
    async with httpx.AsyncClient(timeout=30) as http:
        await wait_keys_known(http, gateway)
        body = orjson.dumps({"model": MODEL, "messages": [], "max_tokens": 1})
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"authorization: Bearer {KEY}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()

        def trickle() -> tuple[int, dict[str, str], bytes, float, bytes]:
            with connect(gateway) as sock:
                sock.sendall(head)
                started = time.monotonic()
                buffer = bytearray()
                # One byte every 0.1 s (the wait for an answer in between), never the last one.
                sock.settimeout(0.1)
                for i in range(len(body) - 1):
                    try:
                        sock.sendall(body[i : i + 1])
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        break  # closed by the gateway
                    buffer += chunk
                    break
                sock.settimeout(RAW_TIMEOUT_S)
                status, headers, answer = read_response(sock, buffer)
                waited = time.monotonic() - started
                rest = read_until_closed(sock, buffer)
                return status, headers, answer, waited, rest

        status, headers, answer, waited_s, rest = await asyncio.to_thread(trickle)
        assert status == 408, answer
        assert headers.get("connection") == "close"
        error = assert_openai_error_body(orjson.loads(answer), "request_timeout")
        assert error["type"] == "invalid_request_error"
        assert rest == b""  # closed after the answer
        assert waited_s < 5.0, waited_s  # the 0.5 s timeout answered, not the whole trickle
        # The key's only slot was freed with the answer: its next request is served.
        served = await http.post(
            f"{gateway.url}/v1/chat/completions",
            content=body,
            headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
        )
        assert served.status_code == 200, served.text
        print(f"trickled body answered 408 after {waited_s:.2f} s (timeout 0.5 s)")
    assert_clean_log(gateway)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/nodes/add", "/health"])
async def test_content_length_with_transfer_encoding_is_refused_and_closed(
    redis_url: str, procs: list[Process], path: str
) -> None:
    gateway = start(procs, redis_url)
    before = (await asyncio.to_thread(httpx.get, f"{gateway.url}/nodes/status")).json()
    body = orjson.dumps({"model": MODEL, "messages": [], "max_tokens": 1})
    smuggled = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    request = (
        b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n"
        b"transfer-encoding: chunked\r\n\r\n%s%s" % (path.encode(), len(chunked), chunked, smuggled)
    )

    def send() -> tuple[int, dict[str, str], bytes, bytes]:
        with connect(gateway) as sock:
            sock.sendall(request)
            buffer = bytearray()
            status, headers, answer = read_response(sock, buffer)
            return status, headers, answer, read_until_closed(sock, buffer)

    status, headers, answer, rest = await asyncio.to_thread(send)
    assert status == 400, answer
    assert headers.get("connection") == "close"
    assert_openai_error_body(orjson.loads(answer), "ambiguous_framing")
    assert rest == b"", rest  # the smuggled request was never answered
    async with httpx.AsyncClient(timeout=30) as http:
        assert await unfinished(http, gateway) == 0
        assert (await http.get(f"{gateway.url}/nodes/status")).json() == before
        metrics = (await http.get(f"{gateway.url}/metrics")).text
    # Not one request reached a node.
    assert 'status="200"' not in metrics
    assert_clean_log(gateway)


@pytest.mark.parametrize(
    ("path", "code", "status"),
    [
        ("/v1/chat/completions", "unsupported_media_type", 415),
        ("/nodes/add", "invalid_api_key", 401),  # the node API, served by Starlette
    ],
)
async def test_a_request_refused_before_its_body_is_read_closes_its_connection(
    redis_url: str, procs: list[Process], path: str, code: str, status: int
) -> None:
    """Found by the fuzzer: a 415 answered before the body arrived left the client believing
    the connection reusable while the server closed it, so the client's next request on it
    failed with no answer. A refusal before the body is read now says ``connection: close``,
    on every path."""
    gateway = start(procs, redis_url, "--admin-key", "admin-key-0123456789")
    head = (
        b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: text/plain\r\ncontent-length: 20\r\n\r\n" % path.encode()
    )

    def refuse() -> tuple[int, dict[str, str], bytes, bytes]:
        with connect(gateway) as sock:
            sock.sendall(head)  # the body never comes
            buffer = bytearray()
            status, headers, answer = read_response(sock, buffer)
            return status, headers, answer, read_until_closed(sock, buffer)

    answered, headers, answer, rest = await asyncio.to_thread(refuse)
    assert answered == status, answer
    assert headers.get("connection") == "close", headers
    assert_openai_error_body(orjson.loads(answer), code)
    assert rest == b""
    assert_clean_log(gateway)


async def test_an_admin_body_trickled_in_gets_408(redis_url: str, procs: list[Process]) -> None:
    """The node API bounds the time of its bodies too: a registration sent a byte at a time
    (from loopback, so an admin call) is answered 408 within ``--body-timeout`` and registers
    nothing."""
    gateway = start(procs, redis_url, "--body-timeout", "0.5")
    body = orjson.dumps({"url": "http://127.0.0.1:9/v1", "status": {"models": ["trickled"]}})
    head = (
        b"POST /nodes/add HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )

    def trickle() -> tuple[int, dict[str, str], bytes, float]:
        with connect(gateway) as sock:
            sock.sendall(head + body[:5])  # the rest never comes
            started = time.monotonic()
            buffer = bytearray()
            status, headers, answer = read_response(sock, buffer)
            return status, headers, answer, time.monotonic() - started

    status, headers, answer, waited_s = await asyncio.to_thread(trickle)
    assert status == 408, answer
    assert headers.get("connection") == "close", headers
    assert_openai_error_body(orjson.loads(answer), "request_timeout")
    async with httpx.AsyncClient(timeout=10) as http:
        listed = (await http.get(f"{gateway.url}/v1/models")).json()
    assert "trickled" not in {m["id"] for m in listed["data"]}
    print(f"trickled admin body answered 408 after {waited_s:.2f} s (timeout 0.5 s)")
    assert_clean_log(gateway)


UNPARSABLE = [
    b"GARBAGE\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\nno colon here\r\n\r\n",
    b"GET /v1/mo dels HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
    b"GET /v1/models?\xff HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: abc\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: " + b"a" * 200_000 + b"\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", UNPARSABLE, ids=range(len(UNPARSABLE)))
async def test_a_request_that_cannot_be_parsed_gets_an_openai_error_and_a_close(
    redis_url: str, procs: list[Process], request_bytes: bytes
) -> None:
    """A request line, header or length the HTTP parser refuses is answered with an
    OpenAI-shaped error body (the server's own answer had an empty one), then closed."""
    gateway = start(procs, redis_url)

    def send() -> tuple[int, dict[str, str], bytes, bytes]:
        with connect(gateway) as sock:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(request_bytes)
            buffer = bytearray()
            status, headers, answer = read_response(sock, buffer)
            return status, headers, answer, read_until_closed(sock, buffer)

    status, headers, answer, rest = await asyncio.to_thread(send)
    assert status in (400, 431), answer
    assert headers.get("connection") == "close" and rest == b""
    code = "invalid_request" if status == 400 else "request_header_fields_too_large"
    assert_openai_error_body(orjson.loads(answer), code)
    assert_clean_log(gateway)
