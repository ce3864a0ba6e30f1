"""Ops through Redis: ``fleetgate nodes`` / ``fleetgate keys`` (and scripts/) against a real
Redis and real gateway replicas (the key store itself: tests/unit/test_store.py)."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import redis.asyncio as aioredis

from tests.support import MODEL
from tests.support.clients import chat
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, ops, replicas_of, together

KEY_A = "key-a-0123456789abcdef"


async def status_of(gateway: Gateway, key: str | None) -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        return (await chat(http, gateway.url, key)).status_code


async def test_keys_in_redis_are_seen_by_every_replica(
    redis_url: str, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    replicas = replicas_of(procs, redis_url, node)
    for gateway in replicas:
        assert await status_of(gateway, None) == 200  # no key anywhere: open

    added = ops(redis_url, "keys", "add", "team-a", "--key", KEY_A)
    assert added.returncode == 0, added.stderr
    made = ops(redis_url, "keys", "add", "team-b", "--json", script=True)
    assert made.returncode == 0, made.stderr
    key_b = orjson.loads(made.stdout)["key"]

    async def closed_everywhere() -> bool:
        return all([await status_of(g, None) == 401 for g in replicas])

    assert await eventually(closed_everywhere, 3)
    for gateway in replicas:
        assert await status_of(gateway, KEY_A) == 200
        assert await status_of(gateway, key_b) == 200
        assert await status_of(gateway, "wrong-key-0123456789") == 401
    # Stored hashed: neither key appears anywhere in Redis.
    client = aioredis.Redis.from_url(redis_url)
    dump = [await client.dump(k) for k in await client.keys("*")]
    await client.aclose()
    assert not any(KEY_A.encode() in d or key_b.encode() in d for d in dump if d)
    listing = ops(redis_url, "keys", "list", "--json")
    assert [k["name"] for k in orjson.loads(listing.stdout)] == ["team-a", "team-b"]

    revoked = ops(redis_url, "keys", "revoke", "team-a")
    assert revoked.returncode == 0, revoked.stderr

    async def revoked_everywhere() -> bool:
        return all([await status_of(g, KEY_A) == 401 for g in replicas])

    assert await eventually(revoked_everywhere, 3)
    assert all([await status_of(g, key_b) == 200 for g in replicas])
    again = ops(redis_url, "keys", "revoke", "team-a")
    assert again.returncode == 1 and "team-a" in again.stderr


async def test_nodes_commands_drive_every_replica(redis_url: str, procs: list[Process]) -> None:
    node = SimNode("--tokens-per-s", "20")
    procs.append(node)
    replicas = together(
        procs, [Gateway("--redis-url", redis_url, listening=False) for _ in range(2)]
    )

    added = ops(redis_url, "nodes", "add", node.url)  # models asked from the node
    assert added.returncode == 0, added.stderr
    assert "added" in added.stdout and MODEL in added.stdout
    for gateway in replicas:
        gateway.wait_models(MODEL, timeout_s=5)
        assert await status_of(gateway, None) == 200
    again = ops(redis_url, "nodes", "add", node.url, "--model", MODEL, script=True)
    assert again.returncode == 0 and "updated" in again.stdout

    changed = ops(
        redis_url,
        "nodes",
        "set",
        node.url,
        "--weight",
        "3",
        "--speed",
        "5",
        "--api-key",
        "node-secret-key",
        "--json",
    )
    assert changed.returncode == 0, changed.stderr
    row = orjson.loads(changed.stdout)["node"]
    assert (row["weight"], row["speed"], row["api_key"]) == (3.0, 5.0, True)
    cleared = ops(redis_url, "nodes", "set", node.url, "--clear-api-key", "--json")
    assert orjson.loads(cleared.stdout)["node"]["api_key"] is False

    async with httpx.AsyncClient(timeout=30) as http:
        # A request in flight when the node is drained: drain waits for it, with progress.
        body = {"model": MODEL, "messages": [], "max_tokens": 30}
        held = asyncio.ensure_future(http.post(f"{replicas[0].url}/v1/chat/completions", json=body))
        await asyncio.sleep(0.4)
        drain = await asyncio.to_thread(ops, redis_url, "nodes", "drain", node.url)
        assert held.done() and (await held).status_code == 200
    assert drain.returncode == 0, drain.stderr
    assert "1 in flight" in drain.stderr and "0 in flight" in drain.stderr
    listing = orjson.loads(ops(redis_url, "nodes", "list", "--json").stdout)
    assert [(n["url"], n["state"], n["in_flight"]) for n in listing] == [(node.url, "draining", 0)]

    async def unrouted() -> bool:
        return all([await status_of(g, None) == 503 for g in replicas])

    assert await eventually(unrouted, 3)
    assert ops(redis_url, "nodes", "set", node.url, "--state", "active").returncode == 0

    async def routed() -> bool:
        return all([await status_of(g, None) == 200 for g in replicas])

    assert await eventually(routed, 3)
    assert ops(redis_url, "nodes", "remove", node.url).returncode == 0

    async def gone() -> bool:
        return all([await status_of(g, None) == 404 for g in replicas])

    assert await eventually(gone, 3)
    missing = ops(redis_url, "nodes", "remove", node.url)
    assert missing.returncode == 1 and "unknown node" in missing.stderr


def test_bad_input_and_unreachable_store_exit_with_one_clear_line(redis_url: str) -> None:
    cases = [
        (ops(redis_url, "nodes", "add", "not-a-url", "--model", "m"), 2, "must be http"),
        (ops(redis_url, "nodes", "add", "http://127.0.0.1:1"), 2, "pass --model"),
        (ops(redis_url, "nodes", "set", "http://127.0.0.1:1", "--weight", "2"), 1, "unknown"),
        (ops(redis_url, "nodes", "set", "http://h:1", "--weight", "-2"), 2, "positive"),
        (ops(redis_url, "nodes", "frobnicate"), 2, "invalid choice"),
        (ops("redis://127.0.0.1:1/0", "nodes", "list"), 3, "cannot reach the store"),
        (ops(redis_url, "keys", "add", "x", "--key", "short"), 2, "at least 16"),
    ]
    for result, code, text in cases:
        lines = result.stderr.strip().splitlines()
        assert result.returncode == code, (result.args, result.stderr)
        assert len(lines) == 1 and text in lines[0], lines
        assert "Traceback" not in result.stderr


async def test_restarting_a_replica_with_node_flags_keeps_operator_changes(
    redis_url: str, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    first = Gateway("--redis-url", redis_url, "--node", node.url)
    procs.append(first)
    first.wait_models(MODEL)
    assert ops(redis_url, "nodes", "set", node.url, "--speed", "5", "--weight", "2").returncode == 0
    assert ops(redis_url, "nodes", "drain", node.url, "--no-wait").returncode == 0
    second = Gateway("--redis-url", redis_url, "--node", node.url)  # a rolling restart
    procs.append(second)

    async def re_registered() -> bool:
        return f"registered node {node.url}" in second.output()

    assert await eventually(re_registered, 10)
    row = orjson.loads(ops(redis_url, "nodes", "list", "--json").stdout)[0]
    assert (row["state"], row["speed"], row["weight"]) == ("draining", 5.0, 2.0)
