"""The status page's parts, in-process on the embedded store: the receipts ring, the page file
and its Content-Security-Policy, the JSON reads it polls (their shapes, limits and access
rule) and the shared-state reads behind them. The page itself, in a real browser on a real
fleet, is tests/e2e/test_ui.py."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.replica.app import Gateway, build_starlette
from gateway.replica.receipts import Receipts
from gateway.replica.settings import GatewaySettings
from gateway.replica.status_page import PageFile
from shared_state import HealthLedger, ProbeResult, Store
from shared_state.health import checker_leader, recent_events

NODE = "http://127.0.0.1:9401"
EVENT_FIELDS = {"t_ms", "node", "from", "to", "reason", "by"}


class Why:
    """A route's stand-in: says its receipt, and counts how often it was asked."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.asked = 0

    def receipt(self, attempts: int) -> str:
        self.asked += 1
        return f"{self.text}; attempts={attempts}"


def keep(receipts: Receipts, n: int, route: Why | None = None) -> None:
    receipts.record(
        t_ms=1000 + n,
        request_id=f"r{n}",
        path="/v1/chat/completions",
        model="m",
        node=NODE,
        status=200,
        ms=1.5,
        attempts=1,
        route=route,
    )


class TestReceipts:
    def test_the_latest_are_kept_newest_first(self) -> None:
        receipts = Receipts(capacity=3)
        for n in range(5):
            keep(receipts, n)
        assert len(receipts) == 3
        assert [r["request_id"] for r in receipts.latest()] == ["r4", "r3", "r2"]
        assert [r["request_id"] for r in receipts.latest(2)] == ["r4", "r3"]
        assert receipts.latest(0) == []

    def test_the_receipt_text_is_written_only_when_read(self) -> None:
        receipts = Receipts()
        why = Why("strategy=random")
        keep(receipts, 1, why)
        keep(receipts, 2)  # refused before any route
        assert why.asked == 0
        newest, oldest = receipts.latest()
        assert newest["route"] is None
        assert oldest["route"] == "strategy=random; attempts=1"
        assert set(oldest) == {
            "t_ms", "request_id", "path", "model", "node", "status", "ms", "attempts", "route"
        }  # fmt: skip

    def test_a_ring_holds_at_least_one(self) -> None:
        with pytest.raises(ValueError, match="at least 1"):
            Receipts(capacity=0)


class TestPageFile:
    def test_the_policy_lets_exactly_the_inline_script_and_style_run(self) -> None:
        page = PageFile.parse("<style>b{}</style><p>x</p><script>go()</script>")
        script = base64.b64encode(hashlib.sha256(b"go()").digest()).decode()
        style = base64.b64encode(hashlib.sha256(b"b{}").digest()).decode()
        assert f"script-src 'sha256-{script}'" in page.csp
        assert f"style-src 'sha256-{style}'" in page.csp
        assert "default-src 'none'" in page.csp and "unsafe" not in page.csp

    def test_a_page_without_script_runs_none(self) -> None:
        assert "script-src 'none'" in PageFile.parse("<p>x</p>").csp

    def test_the_shipped_page_loads_nothing_from_elsewhere(self) -> None:
        page = PageFile.load()
        html = page.body.decode()
        assert html.count("<script>") == 1 and html.count("<style>") == 1
        assert re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) is None
        assert "connect-src 'self'" in page.csp


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    store = Store.open(None)
    yield store
    await store.close()


def client_for(
    store: Store, admin_key: str | None = None, host: str = "127.0.0.1"
) -> tuple[Gateway, httpx.AsyncClient]:
    gateway = Gateway(GatewaySettings(admin_key=admin_key, replica_id="ui-1"), store)
    transport = httpx.ASGITransport(app=build_starlette(gateway), client=(host, 50000))
    return gateway, httpx.AsyncClient(transport=transport, base_url="http://gw")


async def fail_node(store: Store) -> HealthLedger:
    """A checker that leads, and a node it marked unhealthy (one transition recorded)."""
    await store.add_node(NODE, ["m"])
    ledger = HealthLedger(store, "checker-7")
    token, _ = await ledger.lead(10_000)
    await ledger.report(token, NODE, ProbeResult.FAIL, fall=1, rise=1, deregister_after_ms=0)
    return ledger


class TestEndpoints:
    async def test_events_and_the_checker_leader(self, store: Store) -> None:
        _, http = client_for(store)
        async with http:
            assert (await http.get("/nodes/checker")).json()["leader"] is None
            assert (await http.get("/nodes/events")).json()["events"] == []
            await fail_node(store)
            checker = (await http.get("/nodes/checker")).json()
            assert checker["leader"] == "checker-7"  # the id; the fencing token stays inside
            body = (await http.get("/nodes/events?limit=5")).json()
            (event,) = body["events"]
            assert set(event) == EVENT_FIELDS
            assert (event["node"], event["from"], event["to"], event["by"]) == (
                NODE,
                "active",
                "unhealthy",
                "checker-7",
            )
            assert isinstance(body["now_ms"], int)
            for bad in ("0", "1001", "x", "-1"):
                answer = await http.get(f"/nodes/events?limit={bad}")
                assert answer.status_code == 400
                assert answer.json()["error"]["param"] == "limit"

    async def test_receipts(self, store: Store) -> None:
        gateway, http = client_for(store)
        for n in range(3):
            keep(gateway.status_page.receipts, n, Why("strategy=random"))
        async with http:
            body = (await http.get("/nodes/receipts?limit=2")).json()
        assert body["replica"] == "ui-1" and body["kept"] == 50
        assert [r["request_id"] for r in body["receipts"]] == ["r2", "r1"]
        assert body["receipts"][0]["route"] == "strategy=random; attempts=1"

    @pytest.mark.parametrize("path", ["/nodes/events", "/nodes/receipts", "/nodes/checker"])
    async def test_the_admin_rule_guards_the_pages_data(self, store: Store, path: str) -> None:
        _, keyed = client_for(store, admin_key="sesame")
        _, remote = client_for(store, host="192.0.2.7")
        async with keyed, remote:
            assert (await keyed.get(path)).status_code == 401
            wrong = await keyed.get(path, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "invalid admin key" in wrong.text
            right = await keyed.get(path, headers={"authorization": "Bearer sesame"})
            assert right.status_code == 200
            assert (await remote.get(path)).status_code == 403  # no admin key: loopback only

    async def test_the_page_loads_for_anyone_with_its_policy(self, store: Store) -> None:
        _, http = client_for(store, admin_key="sesame", host="192.0.2.7")
        async with http:
            page = await http.get("/ui")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"] == PageFile.load().csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<title>fleetgate status</title>" in page.text


class TestSharedReads:
    async def test_an_entry_that_is_no_event_is_left_out(self, store: Store) -> None:
        await fail_node(store)
        await store.client.lpush(store.keys.events, "not json", '{"t_ms": "soon"}')
        events = await recent_events(store, 10)
        assert [e.to_state for e in events] == ["unhealthy"]

    async def test_no_leader_once_it_resigns(self, store: Store) -> None:
        ledger = await fail_node(store)
        assert await checker_leader(store) == "checker-7"
        await ledger.resign()
        assert await checker_leader(store) is None
