"""Opening the store: a Redis URL (redis, rediss, unix, sentinel) or the embedded store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .errors import InvalidInput

log = logging.getLogger(__name__)

EMBEDDED_URLS = frozenset({"", "embedded", "memory://"})
SENTINEL_SCHEMES = frozenset({"redis+sentinel", "sentinel"})
# Query options of a sentinel URL: how to log in to the sentinels themselves.
_SENTINEL_OPTIONS = frozenset({"sentinel_username", "sentinel_password"})


def is_embedded(url: str | None) -> bool:
    return url is None or url.strip() in EMBEDDED_URLS


def open_redis(url: str | None, *, timeout_s: float = 0.5) -> aioredis.Redis:
    """Return a client for ``url``; ``None`` or ``embedded`` gives the in-process store.

    For Sentinel, :func:`sentinel_clients` names the extra connections to close.

    Timeouts are short on purpose: a frozen Redis must not stall requests for seconds, the
    caller falls back instead. One retry covers a connection dropped by an idle timeout.
    """
    if is_embedded(url):
        return _open_embedded()
    assert url is not None
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1),
        "decode_responses": True,
        "health_check_interval": 30,
    }
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        return _open_sentinel(url, options)
    if scheme not in {"redis", "rediss", "unix"}:
        raise InvalidInput(
            f"unsupported store URL scheme {scheme!r}: use redis://, rediss://, unix:// "
            "or redis+sentinel://"
        )
    try:
        return aioredis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise InvalidInput(f"bad store URL: {exc}") from None


def _open_embedded() -> aioredis.Redis:
    import fakeredis

    # fakeredis caps its pool at 100 "connections"; in-process they cost nothing, and a busy
    # replica has more calls than that in flight.
    client: aioredis.Redis = fakeredis.FakeAsyncRedis(
        server=fakeredis.FakeServer(), decode_responses=True, max_connections=1_000_000
    )
    return client


def _open_sentinel(url: str, options: dict[str, Any]) -> aioredis.Redis:
    """``redis+sentinel://[[user]:password@]host:port[,host:port]/service[/db]``; the user and
    password are the master's, ``?sentinel_password=…`` (and ``sentinel_username``) the
    sentinels' own when they require one."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidInput(f"bad sentinel address {item!r} in store URL")
        hosts.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise InvalidInput("sentinel URL needs a service name: redis+sentinel://h:p/service")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise InvalidInput(f"sentinel URL path must be /service or /service/db, not {parts.path!r}")
    db = int(path[1]) if len(path) == 2 else 0
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - _SENTINEL_OPTIONS)
    if unknown:
        raise InvalidInput(
            f"unknown sentinel URL option(s) {', '.join(unknown)}: "
            f"use {', '.join(sorted(_SENTINEL_OPTIONS))}"
        )
    sentinel_auth = {k.removeprefix("sentinel_"): v[-1] for k, v in query.items()}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        hosts,
        # redis-py's default retries back off for seconds per sentinel: a store call would
        # stall that long when the sentinels are gone.
        sentinel_kwargs={
            "socket_timeout": options["socket_timeout"],
            "socket_connect_timeout": options["socket_connect_timeout"],
            "retry": options["retry"],
            **sentinel_auth,
        },
        socket_timeout=options["socket_timeout"],
        socket_connect_timeout=options["socket_connect_timeout"],
    )
    master: aioredis.Redis = sentinel.master_for(
        path[0], username=username, password=password, db=db, **options
    )
    _SENTINELS[id(master)] = list(sentinel.sentinels)
    return master


_SENTINELS: dict[int, list[aioredis.Redis]] = {}


async def drop_connections(client: aioredis.Redis) -> None:
    """Close every pooled connection of ``client``; the next calls connect anew. A failure to
    close one is moot: it is dropped either way."""
    with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
        await client.connection_pool.disconnect()


async def close_redis(client: aioredis.Redis) -> None:
    """Close a client from :func:`open_redis`, with the Sentinel connections it used."""
    await client.aclose()
    for sentinel in _SENTINELS.pop(id(client), []):
        await sentinel.aclose()
