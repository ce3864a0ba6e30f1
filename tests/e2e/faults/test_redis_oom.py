"""A Redis that answers but refuses writes: out of memory under ``noeviction`` (``maxmemory``
reached by filling it), a replica (READONLY), a failed snapshot (MISCONF). Admin writes answer
an OpenAI-shaped 503, the ops CLI exits 3 with one line, lease renewals are counted and make
``/ready`` 503 with the reason, and requests keep being routed from the local snapshot."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc
from openai.types.chat import ChatCompletionMessageParam

from shared_state import Store, StoreRefusingWrites, StoreUnavailable
from tests.support import MODEL
from tests.support.clients import async_sdk
from tests.support.harness import RedisServer, free_port
from tests.support.openai_errors import assert_openai_error
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, ops, together

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
# Small values: a large one inflates the query buffer, which counts as used memory only while
# the command is read, so the server would drop back under the limit after refusing it.
FILL_VALUE = b"x" * 1024
FILL_LIMIT = 20_000  # 20 MB at most: far above the 2 MB of headroom given below


@pytest.fixture
def oom_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own: it is filled until it refuses writes."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
async def oom_client(oom_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(oom_redis.url)
    yield client
    await client.aclose()


async def fill_until_oom(client: aioredis.Redis) -> int:
    """Give Redis 2 MB of headroom under ``noeviction`` and fill it, as an attacker would,
    until it answers OOM; returns how many values it took."""
    await client.config_set("maxmemory-policy", "noeviction")
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", used + 2 * 1024 * 1024)
    for count in range(FILL_LIMIT):
        try:
            await client.set(f"attack:{count}", FILL_VALUE)
        except rexc.OutOfMemoryError:
            # Allocator and buffer jitter let a write through now and then; an attacker keeps
            # it full, the limit 1 MB under what is used does the same.
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory", used - 1024 * 1024)
            with pytest.raises(rexc.OutOfMemoryError):
                await client.set("attack:probe", b"x")
            return count
    raise AssertionError(f"Redis took {FILL_LIMIT} values without refusing one")


async def free_memory(client: aioredis.Redis) -> None:
    """Lift the limit and drop the filling: Redis takes writes again."""
    await client.config_set("maxmemory", 0)
    keys = [key async for key in client.scan_iter("attack:*", count=1000)]
    if keys:
        await client.delete(*keys)


def metric(text: str, line_prefix: str) -> float:
    """The value of the sample line starting with ``line_prefix`` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_gateway_under_oom_routes_refuses_admin_writes_and_is_not_ready(
    oom_redis: RedisServer, oom_client: aioredis.Redis, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    # Leases of 1.5 s: renewed every 0.5 s, so /ready follows within a second.
    gateway = Gateway("--redis-url", oom_redis.url, "--node", node.url, "--lease-seconds", "1.5")
    procs.append(gateway)
    gateway.wait_models(MODEL)
    sdk = async_sdk(gateway.url, timeout=10)
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{gateway.url}/ready")).status_code == 200
        assert await fill_until_oom(oom_client) > 0

        new_node = {"url": "http://127.0.0.1:9", "status": {"models": [MODEL]}}
        add = await http.post(f"{gateway.url}/nodes/add", json=new_node)
        error = assert_openai_error(add, 503, "store_refusing_writes")
        assert "OOM" in error["message"] and add.headers["retry-after"]
        drain = await http.post(f"{gateway.url}/nodes/drain", json={"url": node.url})
        assert_openai_error(drain, 503, "store_refusing_writes")

        # Requests keep being routed: from the local snapshot when the pick is refused (a
        # pick whose script already wrote, e.g. sweeping an expired lease, may still pass).
        for _ in range(20):
            raw = await sdk.chat.completions.with_raw_response.create(
                model=MODEL, messages=CHAT, max_tokens=1
            )
            assert raw.parse().choices

        async def not_ready() -> bool:
            ready = await http.get(f"{gateway.url}/ready")
            return ready.status_code == 503 and ready.json()["store"] == "refusing writes"

        assert await eventually(not_ready, timeout_s=5), await http.get(f"{gateway.url}/ready")
        body = (await http.get(f"{gateway.url}/ready")).json()
        assert body["ready"] is False and body["degraded"] is True
        assert any("lease renewals failing" in r and "OOM" in r for r in body["reasons"]), body
        metrics = (await http.get(f"{gateway.url}/metrics")).text
        assert metric(metrics, 'fleetgate_store_errors_total{op="renew"}') >= 1
        assert metric(metrics, "fleetgate_degraded ") == 1

        await free_memory(oom_client)

        async def ready_again() -> bool:
            return (await http.get(f"{gateway.url}/ready")).status_code == 200

        assert await eventually(ready_again, timeout_s=5), gateway.output()
        body = (await http.get(f"{gateway.url}/ready")).json()
        assert body["store"] == "ok" and body["reasons"] == []
        add = await http.post(f"{gateway.url}/nodes/add", json=new_node)
        assert add.status_code == 200, add.text
        remove = await http.post(f"{gateway.url}/nodes/remove", json={"url": new_node["url"]})
        assert remove.status_code == 200, remove.text
        raw = await sdk.chat.completions.with_raw_response.create(
            model=MODEL, messages=CHAT, max_tokens=1
        )
        assert "state=shared" in raw.headers["x-fleetgate-route"]
        metrics = (await http.get(f"{gateway.url}/metrics")).text
        assert metric(metrics, "fleetgate_degraded ") == 0
        assert metric(metrics, "fleetgate_in_flight_total ") == 0
    await sdk.close()
    store = Store.open(oom_redis.url)
    try:
        assert await store.in_flight(node.url) == 0
    finally:
        await store.close()
    assert "Traceback" not in gateway.output()


async def test_ops_cli_exits_3_with_one_line_when_redis_refuses_writes(
    oom_redis: RedisServer, oom_client: aioredis.Redis
) -> None:
    url = oom_redis.url
    await fill_until_oom(oom_client)
    for command in (
        ("nodes", "add", "http://127.0.0.1:9/", "--model", MODEL),
        ("keys", "add", "team-a"),
    ):
        done = await asyncio.to_thread(ops, url, *command)
        assert done.returncode == 3, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "refuses writes" in lines[0] and "OOM" in lines[0], lines
    # Reads still work: the registry is not read in a MULTI, which Redis refuses out of memory.
    listing = await asyncio.to_thread(ops, url, "nodes", "list")
    assert listing.returncode == 0 and "no nodes registered" in listing.stdout, listing.stderr
    await free_memory(oom_client)
    done = await asyncio.to_thread(
        ops, url, "nodes", "add", "http://127.0.0.1:9/", "--model", MODEL
    )
    assert done.returncode == 0, done.stderr


async def test_ops_cli_on_a_read_only_replica_exits_3(
    oom_redis: RedisServer, oom_client: aioredis.Redis
) -> None:
    master = RedisServer().start()
    try:
        await oom_client.replicaof("127.0.0.1", master.port)
        done = await asyncio.to_thread(
            ops, oom_redis.url, "nodes", "add", "http://127.0.0.1:9/", "--model", MODEL
        )
        assert done.returncode == 3, (done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "READONLY" in lines[0], lines
    finally:
        await oom_client.replicaof("NO", "ONE")
        master.close()


@pytest.mark.parametrize(
    "reply",
    [
        rexc.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        rexc.ReadOnlyError("You can't write against a read only replica."),
        rexc.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's ..."),
        rexc.ResponseError("OOM command not allowed when used memory > 'maxmemory'. script: x"),
        rexc.ResponseError("NOREPLICAS Not enough good replicas to write."),
    ],
)
async def test_write_refusals_map_to_store_refusing_writes(
    oom_redis: RedisServer, reply: rexc.ResponseError
) -> None:
    """Both clients' forms of a refusal (redis-py's classes, the pipeline's raw replies) map
    to one error, and the breaker stays closed: reads go on."""
    store = Store.open(oom_redis.url)
    try:
        with pytest.raises(StoreRefusingWrites) as raised:
            async with store.guard():
                raise reply
        assert raised.value.status_code == 503
        assert str(raised.value).split(": ", 1)[1].split(" ", 1)[0] in {
            "OOM",
            "READONLY",
            "MISCONF",
            "NOREPLICAS",
        }
        assert not store.degraded
        assert await store.epoch() == 0
    finally:
        await store.close()


@pytest.mark.parametrize(
    "reply",
    [
        rexc.ResponseError("LOADING Redis is loading the dataset in memory"),
        rexc.ResponseError("BUSY Redis is busy running a script."),
        rexc.MasterDownError("Link with MASTER is down and replica-serve-stale-data is no"),
        rexc.ResponseError("NOAUTH Authentication required."),
        rexc.ResponseError("WRONGPASS invalid username-password pair or user is disabled."),
        rexc.ResponseError("NOPERM User fleet has no permissions to run the 'evalsha' command"),
    ],
)
async def test_a_redis_not_serving_this_client_is_unavailable_and_opens_the_breaker(
    oom_redis: RedisServer, reply: rexc.ResponseError
) -> None:
    store = Store.open(oom_redis.url)
    try:
        with pytest.raises(StoreUnavailable) as raised:
            async with store.guard():
                raise reply
        assert not isinstance(raised.value, StoreRefusingWrites)
        assert store.degraded  # fails fast until the cooldown is over
    finally:
        await store.close()


async def test_a_wrong_redis_password_is_an_unavailable_store_on_the_pipelined_path(
    procs: list[Process],
) -> None:
    """Scripts go through the pipelined client, which gets NOAUTH and WRONGPASS as plain
    replies: renewals are counted and /ready says why, with no traceback in the log."""
    server = RedisServer("--requirepass", "right").start()
    try:
        url = f"redis://:wrong@127.0.0.1:{server.port}/0"
        store = Store.open(url)
        try:
            with pytest.raises(StoreUnavailable, match="WRONGPASS"):
                await store.renew("r", [])
        finally:
            await store.close()
        gateway = Gateway("--redis-url", url, "--lease-seconds", "1.5")
        procs.append(gateway)
        async with httpx.AsyncClient(timeout=10) as http:

            async def renewals_counted() -> bool:
                text = (await http.get(f"{gateway.url}/metrics")).text
                return metric(text, 'fleetgate_store_errors_total{op="renew"}') >= 2

            assert await eventually(renewals_counted, timeout_s=5), gateway.output()
            ready = await http.get(f"{gateway.url}/ready")
            assert ready.status_code == 503
            reasons = ready.json()["reasons"]
            assert any("lease renewals failing" in r for r in reasons), reasons
            chat = await http.post(
                f"{gateway.url}/v1/chat/completions",
                json={"model": MODEL, "messages": CHAT, "max_tokens": 1},
            )
            # No registry was ever read: whether keys are required is unknown, so the API is
            # not open (and no model would be known either).
            assert_openai_error(chat, 503, "store_unavailable")
        assert "Traceback" not in gateway.output()
    finally:
        server.close()


async def test_a_redis_that_cannot_persist_refuses_writes_with_503_and_exit_3(
    oom_redis: RedisServer, oom_client: aioredis.Redis, procs: list[Process]
) -> None:
    """MISCONF: snapshots configured, the last one failed (its directory is gone), so Redis
    stops taking writes: admin writes answer 503, the ops CLI exits 3 with one line."""
    shutil.rmtree(oom_redis.dir)
    await oom_client.config_set("save", "3600 1")
    await oom_client.bgsave()

    async def save_failed() -> bool:
        info = await oom_client.info("persistence")
        return bool(info["rdb_last_bgsave_status"] == "err")

    assert await eventually(save_failed, timeout_s=10)
    with pytest.raises(rexc.ResponseError, match="MISCONF"):
        await oom_client.set("probe", "x")
    done = await asyncio.to_thread(
        ops, oom_redis.url, "nodes", "add", "http://127.0.0.1:9/", "--model", MODEL
    )
    assert done.returncode == 3, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "MISCONF" in lines[0], lines
    gateway = Gateway("--redis-url", oom_redis.url)
    procs.append(gateway)
    async with httpx.AsyncClient(timeout=10) as http:
        add = await http.post(
            f"{gateway.url}/nodes/add",
            json={"url": "http://127.0.0.1:9", "status": {"models": [MODEL]}},
        )
    error = assert_openai_error(add, 503, "store_refusing_writes")
    assert "MISCONF" in error["message"]
    assert "Traceback" not in gateway.output()


async def test_ops_cli_never_prints_a_store_password() -> None:
    server = RedisServer("--requirepass", "right").start()
    try:
        dead = f"127.0.0.1:{free_port()}"
        for url in (
            f"redis://:wrong-pw-1@127.0.0.1:{server.port}/0",
            f"redis+sentinel://fleet:wrong-pw-2@{dead}/fleet?sentinel_password=wrong-pw-3",
        ):
            done = await asyncio.to_thread(ops, url, "nodes", "list")
            assert done.returncode == 3, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "***" in lines[0], lines
            assert "wrong-pw" not in done.stderr + done.stdout, lines
    finally:
        server.close()


async def test_an_admin_write_refused_for_want_of_memory_changed_nothing(
    oom_redis: RedisServer, oom_client: aioredis.Redis, procs: list[Process]
) -> None:
    """A removal or a drain refused with 503 left the registry as it was (a script that wrote
    before the refusal would have removed the node without telling the replicas); the
    registry can still be read (ops ``nodes list``) while Redis refuses writes."""
    nodes = together(procs, [SimNode("--tokens-per-s", "inf", listening=False) for _ in range(2)])
    gateway = Gateway("--redis-url", oom_redis.url, *[a for n in nodes for a in ("--node", n.url)])
    procs.append(gateway)
    gateway.wait_models(MODEL)
    store = Store.open(oom_redis.url)
    try:
        before = await store.registry()
        assert await fill_until_oom(oom_client) > 0
        async with httpx.AsyncClient(timeout=10) as http:
            for path in ("/nodes/remove", "/nodes/drain"):
                answer = await http.post(f"{gateway.url}{path}", json={"url": nodes[0].url})
                assert_openai_error(answer, 503, "store_refusing_writes")
        after = await store.registry()
        assert after.epoch == before.epoch
        assert sorted(after.nodes, key=lambda n: n.id) == sorted(before.nodes, key=lambda n: n.id)
        listing = ops(oom_redis.url, "nodes", "list")
        assert listing.returncode == 0, listing.stderr
        assert nodes[0].url in listing.stdout and nodes[1].url in listing.stdout
    finally:
        await free_memory(oom_client)
        await store.close()
    assert "Traceback" not in gateway.output()


async def test_ready_follows_the_store_within_seconds_with_the_default_lease(
    oom_redis: RedisServer, oom_client: aioredis.Redis, procs: list[Process]
) -> None:
    """With the default 30 s lease, renewals run every 10 s; while they fail they are tried
    every second, so /ready is 200 again within seconds of Redis taking writes again, not up
    to 10 s later."""
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    gateway = Gateway("--redis-url", oom_redis.url, "--node", node.url)
    procs.append(gateway)
    gateway.wait_models(MODEL)
    async with httpx.AsyncClient(timeout=10) as http:
        await fill_until_oom(oom_client)

        async def not_ready() -> bool:
            return (await http.get(f"{gateway.url}/ready")).status_code == 503

        # The first renewal after the fill fails (within 10 s); then the store comes back.
        assert await eventually(not_ready, timeout_s=15)
        await free_memory(oom_client)

        async def ready() -> bool:
            return (await http.get(f"{gateway.url}/ready")).status_code == 200

        assert await eventually(ready, timeout_s=4), (await http.get(f"{gateway.url}/ready")).text
    assert "Traceback" not in gateway.output()
