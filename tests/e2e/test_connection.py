"""Connecting the store: unix socket, TLS (rediss) and Sentinel, each to a real server (URLs
that name no store: tests/unit/test_connection.py)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from shared_state import Outcome, Store, StoreUnavailable
from tests.support.harness import RedisServer, free_port, wait_for_port

NODE = "http://127.0.0.1:9401"


async def exercise(url: str) -> None:
    """Register, pick, release: both the pipelined and the redis-py paths are used."""
    store = Store.open(url, timeout_s=2.0)
    try:
        await store.add_node(NODE, ["m"])
        pick = await store.pick("m", strategy="least_connections", replica="r", request_id="1")
        assert pick is not None and pick.node.id == NODE
        assert (await store.release(pick.lease, Outcome.OK, 0.05)).released
        assert [s.latencies_s for s in await store.status()] == [(0.05,)]
        await store.remove_node(NODE)
    finally:
        await store.close()


async def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    server = RedisServer("--unixsocket", str(sock), "--unixsocketperm", "700").start()
    try:
        for _ in range(100):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        await exercise(f"unix://{sock}?db=2")
    finally:
        server.close()


async def test_tls_verifies_the_server_certificate(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    tls_port = free_port()
    server = RedisServer(
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    ).start()
    try:
        wait_for_port(tls_port)
        await exercise(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}")
        # Without the CA the certificate is refused: the store reports itself unavailable.
        store = Store.open(f"rediss://127.0.0.1:{tls_port}/0", timeout_s=2.0)
        with pytest.raises(StoreUnavailable):
            await store.add_node(NODE, ["m"])
        await store.close()
    finally:
        server.close()


async def test_sentinel_finds_the_master(tmp_path: Path) -> None:
    master = RedisServer().start()
    sentinel_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\nprotected-mode no\ndir {tmp_path}\n"
        f"sentinel monitor fleet 127.0.0.1 {master.port} 1\n"
    )
    sentinel = subprocess.Popen(  # noqa: ASYNC220 - a server process, started once
        [master.exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(sentinel_port)
        deadline = time.monotonic() + 10
        while True:  # the sentinel answers once it has looked at the master
            try:
                await exercise(f"redis+sentinel://127.0.0.1:{sentinel_port}/fleet")
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        sentinel.kill()
        sentinel.wait()
        master.close()
