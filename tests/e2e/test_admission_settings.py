"""Fleet-wide admission settings set by an operator against a real Redis: a node's capacity
(``nodes add/set --max-inflight``, ``POST /nodes/add`` with ``max_inflight``, shown by
``nodes list`` and ``/nodes/status``) and a client key's priority, priority cap and fair share
(``keys add/set --priority/--max-priority/--share``, shown by ``keys list``). The settings as
stored: tests/unit/test_admission_settings.py."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from tests.support import MODEL
from tests.support.openai_errors import assert_openai_error
from tests.support.processes import Gateway, Process, ops

KEY_A = "key-a-0123456789abcdef"


def node_row(redis_url: str, url: str) -> dict[str, Any]:
    listing = ops(redis_url, "nodes", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {row["url"]: row for row in orjson.loads(listing.stdout)}
    found: dict[str, Any] = rows[url]
    return found


async def status_entry(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await http.get("/nodes/status")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()[url]
    return found


async def test_the_ops_cli_and_the_node_api_set_a_nodes_capacity(
    redis_url: str, procs: list[Process]
) -> None:
    url, other = "http://127.0.0.1:9711", "http://127.0.0.1:9712"
    added = ops(redis_url, "nodes", "add", url, "--model", MODEL, "--max-inflight", "4")
    assert added.returncode == 0, added.stderr
    assert "MAX-INFLIGHT" in added.stdout.splitlines()[1]
    assert node_row(redis_url, url)["max_inflight"] == 4
    gateway = Gateway("--redis-url", redis_url)
    procs.append(gateway)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        assert (await status_entry(http, url))["max_inflight"] == 4

        changed = ops(redis_url, "nodes", "set", url, "--max-inflight", "8", "--json")
        assert changed.returncode == 0, changed.stderr
        assert orjson.loads(changed.stdout)["node"]["max_inflight"] == 8
        assert (await status_entry(http, url))["max_inflight"] == 8
        kept = ops(redis_url, "nodes", "set", url, "--weight", "2")  # other fields: kept
        assert kept.returncode == 0 and node_row(redis_url, url)["max_inflight"] == 8
        cleared = ops(redis_url, "nodes", "set", url, "--max-inflight", "0", "--json")
        assert cleared.returncode == 0, cleared.stderr
        assert orjson.loads(cleared.stdout)["node"]["max_inflight"] is None  # unlimited
        assert (await status_entry(http, url))["max_inflight"] is None

        # Through the node API (an admin: the loopback without --admin-key).
        body = {"url": other, "models": [MODEL], "max_inflight": 16}
        registered = await http.post("/nodes/add", json=body)
        assert registered.status_code == 200, registered.text
        assert registered.json()["node"]["max_inflight"] == 16
        assert (await status_entry(http, other))["max_inflight"] == 16
        assert node_row(redis_url, other)["max_inflight"] == 16
        for value in (0, -1, 1_000_001, "16", True, 2.5):
            refused = await http.post("/nodes/add", json={**body, "max_inflight": value})
            error = assert_openai_error(refused, 400)
            assert error["param"] == "max_inflight" and "max_inflight" in error["message"]
        assert (await status_entry(http, other))["max_inflight"] == 16

    for args in (
        ("add", "http://127.0.0.1:9713", "--model", MODEL, "--max-inflight", "0"),
        ("set", url, "--max-inflight", "-1"),
        ("set", url, "--max-inflight", "1000001"),
        ("set", url, "--max-inflight", "many"),
    ):
        bad = ops(redis_url, "nodes", *args)
        assert bad.returncode == 2 and "--max-inflight" in bad.stderr, bad.stderr
        assert "whole number" in bad.stderr
    assert node_row(redis_url, url)["max_inflight"] is None


def key_rows(redis_url: str) -> dict[str, dict[str, Any]]:
    listing = ops(redis_url, "keys", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    return {row["name"]: row for row in orjson.loads(listing.stdout)}


def admission(row: dict[str, Any]) -> tuple[str, str | None, int]:
    return row["priority"], row["max_priority"], row["share"]


def test_the_ops_cli_sets_a_keys_admission(redis_url: str) -> None:
    flags = ("--priority", "high", "--max-priority", "high", "--share", "3")
    added = ops(redis_url, "keys", "add", "batch", "--key", KEY_A, "--rpm", "5", *flags)
    assert added.returncode == 0, added.stderr
    assert "priority high, max priority high, share 3" in added.stdout
    made = ops(redis_url, "keys", "add", "plain", "--json")
    assert made.returncode == 0, made.stderr
    assert admission(orjson.loads(made.stdout)) == ("normal", None, 1)
    rows = key_rows(redis_url)
    assert admission(rows["batch"]) == ("high", "high", 3) and rows["batch"]["rpm"] == 5
    assert admission(rows["plain"]) == ("normal", None, 1)
    table = ops(redis_url, "keys", "list").stdout.splitlines()
    assert table[0].split()[-3:] == ["PRIORITY", "MAX-PRIORITY", "SHARE"]
    assert table[1].split()[-3:] == ["high", "high", "3"]
    assert table[2].split()[-3:] == ["normal", "any", "1"]

    # set changes only what is given; "any" removes the cap, the defaults are stored as absent.
    changed = ops(redis_url, "keys", "set", "batch", "--priority", "low", "--max-priority", "any")
    assert changed.returncode == 0 and "batch: changed" in changed.stdout, changed.stderr
    assert admission(key_rows(redis_url)["batch"]) == ("low", None, 3)
    again = ops(redis_url, "keys", "set", "batch", "--share", "3", "--json")
    assert again.returncode == 0 and orjson.loads(again.stdout)["result"] == "unchanged"
    reset = ops(redis_url, "keys", "set", "batch", "--priority", "normal", "--share", "1")
    assert reset.returncode == 0, reset.stderr
    row = key_rows(redis_url)["batch"]
    assert admission(row) == ("normal", None, 1) and row["rpm"] == 5

    for args, flag in (
        (("set", "batch", "--priority", "urgent"), "--priority"),
        (("set", "batch", "--max-priority", "none"), "--max-priority"),
        (("set", "batch", "--share", "0"), "--share"),
        (("add", "other", "--share", "1001"), "--share"),
    ):
        bad = ops(redis_url, "keys", *args)
        assert bad.returncode == 2 and flag in bad.stderr, bad.stderr
    nothing = ops(redis_url, "keys", "set", "batch")
    assert nothing.returncode == 2 and "--priority" in nothing.stderr, nothing.stderr
    missing = ops(redis_url, "keys", "set", "nobody", "--priority", "high")
    assert missing.returncode == 1 and "nobody" in missing.stderr
    assert sorted(key_rows(redis_url)) == ["batch", "plain"]
