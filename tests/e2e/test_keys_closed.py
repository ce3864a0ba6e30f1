"""Client keys keep the OpenAI API closed: once a key was added with ``fleetgate keys add``,
revoking the last one leaves every replica (started without ``--api-key``) refusing callers
without a valid key, ``/nodes/status`` included, until ``fleetgate keys open`` opens it on
purpose. Two real replicas share one real Redis."""

from __future__ import annotations

import httpx

from tests.support.clients import chat
from tests.support.harness import RedisServer
from tests.support.openai_errors import assert_openai_error
from tests.support.polling import eventually
from tests.support.processes import Gateway, Process, SimNode, ops, replicas_of

KEY = "closed-key-0123456789abcdef"
GARBAGE = (None, "garbage-key-0123456789", "x", KEY.upper())


async def answers(http: httpx.AsyncClient, replicas: list[Gateway]) -> set[int]:
    """Every status the replicas give to chats without a key or with a garbage one, and to
    ``/nodes/status`` without a key."""
    seen = {(await chat(http, g.url, key)).status_code for g in replicas for key in GARBAGE}
    seen |= {(await http.get(f"{g.url}/nodes/status")).status_code for g in replicas}
    return seen


async def test_revoking_the_last_key_keeps_every_replica_closed_until_opened(
    redis_url: str, procs: list[Process]
) -> None:
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    replicas = replicas_of(procs, redis_url, node)
    async with httpx.AsyncClient(timeout=10) as http:
        assert await answers(http, replicas) == {200}  # no key ever: open

        added = ops(redis_url, "keys", "add", "only", "--key", KEY)
        assert added.returncode == 0, added.stderr

        async def closed() -> bool:
            return await answers(http, replicas) == {401}

        assert await eventually(closed, 10)
        refused = ops(redis_url, "keys", "open")  # not while a key is stored
        assert refused.returncode != 0 and "still stored" in refused.stderr, refused.stderr

        revoked = ops(redis_url, "keys", "revoke", "only")
        assert revoked.returncode == 0, revoked.stderr

        async def key_refused() -> bool:
            return all([(await chat(http, g.url, KEY)).status_code == 401 for g in replicas])

        assert await eventually(key_refused, 10)  # every replica has seen the revocation
        for gateway in replicas:
            for key in GARBAGE:
                assert_openai_error(await chat(http, gateway.url, key), 401, "invalid_api_key")
            assert_openai_error(await http.get(f"{gateway.url}/nodes/status"), 401)
        assert ops(redis_url, "keys", "list").stdout.strip() == "no API keys stored"

        # A replica started now, after the revocation, is closed from its first request.
        late = Gateway("--redis-url", redis_url)
        procs.append(late)
        assert await answers(http, [late]) == {401}

        opened = ops(redis_url, "keys", "open")
        assert opened.returncode == 0, opened.stderr
        assert "opened" in opened.stdout

        async def open_everywhere() -> bool:
            return await answers(http, [*replicas, late]) == {200}

        assert await eventually(open_everywhere, 10)
        again = ops(redis_url, "keys", "open", "--json")
        assert again.returncode == 0 and "already open" in again.stdout


async def test_a_replica_that_never_reached_its_store_is_not_open(procs: list[Process]) -> None:
    """Started while Redis is unreachable, a replica cannot know whether keys are stored
    there: it answers 503 ``store_unavailable`` to callers without its own ``--api-key``
    (it used to take every caller, on a fleet whose keys were stored), and follows the
    store's keys once it answers."""
    node = SimNode("--tokens-per-s", "inf")
    procs.append(node)
    server = RedisServer()  # its port is chosen; nothing listens there yet
    try:
        gateway = Gateway("--redis-url", server.url, "--node", node.url)
        procs.append(gateway)
        async with httpx.AsyncClient(timeout=10) as http:
            for key in (None, "garbage-key-0123456789"):
                refused = await chat(http, gateway.url, key)
                error = assert_openai_error(refused, 503, "store_unavailable")
                assert "store" in error["message"]
            server.start()
            added = ops(server.url, "keys", "add", "only", "--key", KEY)
            assert added.returncode == 0, added.stderr

            async def follows_the_store() -> bool:
                without = await chat(http, gateway.url, None)
                with_key = await chat(http, gateway.url, KEY)
                return without.status_code == 401 and with_key.status_code == 200

            assert await eventually(follows_the_store, 15)
        assert "Traceback" not in gateway.output()
    finally:
        server.close()
