"""The status page, ``GET /ui``, in a real headless Chromium driven by Selenium, on a real fleet:
a redis-server, two simulated nodes, a gateway replica and the health-checker (fast rounds).

One fleet and one browser serve the whole module, and its tests run in file order: the page
shows every node and this replica's requests; a node killed turns unhealthy on the page without
a reload; Redis frozen (SIGSTOP) brings the banner while the last data stays, marked stale. The
admin-key flow runs on a second replica of the same fleet that wants a key.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver import Chrome
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import MODEL
from tests.support.harness import RedisServer
from tests.support.processes import Checker, Gateway, Process, SimNode

ADMIN_KEY = "ui-admin-key"
CLIENT_KEY = "ui-client-key"
WAIT_S = 15.0  # the page polls every 2 s; the checker needs 2 failed rounds of 0.2 s


@dataclass
class Fleet:
    redis: RedisServer
    nodes: list[SimNode]
    gateway: Gateway
    checker: Checker


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    redis = RedisServer().start()
    started: list[Process] = []
    try:
        nodes = [
            SimNode(name="ui-a"),
            SimNode("--model", MODEL, "--model", "ui-other", name="ui-b"),
        ]
        started += nodes
        node_flags = [flag for n in nodes for flag in ("--node", n.url)]
        gateway = Gateway("--redis-url", redis.url, *node_flags, name="ui-gw")
        started.append(gateway)
        checker = Checker(redis.url, "ui-checker", "--fall", "2", "--timeout", "0.5")
        started.append(checker)
        gateway.wait_models("ui-other")
        yield Fleet(redis, nodes, gateway, checker)
    finally:
        redis.resume()
        for proc in reversed(started):
            proc.close()
        redis.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise RuntimeError(
            "chromium and chromedriver are not installed (.ci/run installs them: "
            "apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1400,1200")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield chrome
    finally:
        chrome.quit()


def wait(browser: Chrome, what: str, check: Callable[[], object]) -> None:
    """Poll ``check`` (reading the page, never reloading it) until it is truthy."""
    WebDriverWait(browser, WAIT_S, poll_frequency=0.1).until(lambda _: check(), message=what)


def node_state(browser: Chrome, url: str) -> str | None:
    """The state the page shows for node ``url``; None when it lists no such node."""
    state = browser.execute_script(
        """const row = [...document.querySelectorAll('#nodes tbody tr')]
             .find((tr) => tr.dataset.node === arguments[0]);
           return row ? row.querySelector('.state').textContent : null;""",
        url,
    )
    return None if state is None else str(state)


def node_rows(browser: Chrome) -> int:
    return int(
        browser.execute_script("return document.querySelectorAll('#nodes tr[data-node]').length")
    )


def shown(browser: Chrome, element_id: str) -> bool:
    return bool(
        browser.execute_script("return !document.getElementById(arguments[0]).hidden", element_id)
    )


def classes(element: WebElement) -> list[str]:
    return (element.get_dom_attribute("class") or "").split()


def problems_in_console(browser: Chrome) -> list[str]:
    """Errors the page logged: a script error, a Content-Security-Policy refusal. The network
    errors a test causes on purpose (401, 503) are the page's to show, not problems."""
    return [
        entry["message"]
        for entry in browser.get_log("browser")  # type: ignore[no-untyped-call]
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]


def test_the_page_shows_every_node_and_this_replicas_requests(
    fleet: Fleet, browser: Chrome
) -> None:
    page = httpx.get(f"{fleet.gateway.url}/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "http" not in policy  # nothing from elsewhere
    request_ids = []
    for _ in range(3):
        answer = httpx.post(
            f"{fleet.gateway.url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert answer.status_code == 200
        request_ids.append(answer.headers["x-request-id"])

    browser.get(f"{fleet.gateway.url}/ui")
    urls = [node.url for node in fleet.nodes]
    wait(browser, "every node active", lambda: {node_state(browser, u) for u in urls} == {"active"})
    assert node_rows(browser) == 2
    leader = browser.find_element(By.ID, "leader")
    wait(browser, "the checker leads", lambda: leader.text == "ui-checker")  # its id only
    assert "(this one)" in browser.find_element(By.ID, "replicas").text
    queue = browser.find_element(By.ID, "queue").text
    assert MODEL in queue and "ui-other" in queue
    receipts = browser.find_element(By.ID, "receipts").text
    assert all(request_id in receipts for request_id in request_ids)
    assert "strategy=" in receipts
    assert not shown(browser, "banner") and not shown(browser, "auth")
    # The charts: in flight for each node, latency for those with samples (the requests'
    # nodes).
    assert len(browser.find_elements(By.CSS_SELECTOR, "#inflight-chart polyline")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#latency-chart polyline")) >= 1
    assert problems_in_console(browser) == []


def test_a_killed_node_turns_unhealthy_without_a_reload(fleet: Fleet, browser: Chrome) -> None:
    browser.execute_script("window.notReloaded = true")
    dead = fleet.nodes[1]
    dead.kill()
    wait(browser, "marked unhealthy", lambda: node_state(browser, dead.url) == "unhealthy")
    assert browser.execute_script("return window.notReloaded") is True
    assert node_state(browser, fleet.nodes[0].url) == "active"
    # The checker's transition is listed, with who made it.
    events = browser.find_element(By.ID, "events")
    wait(browser, "the transition listed", lambda: dead.url in events.text)
    assert "active → unhealthy" in events.text and "ui-checker" in events.text


def test_redis_frozen_shows_a_banner_and_keeps_the_last_data(fleet: Fleet, browser: Chrome) -> None:
    section = browser.find_element(By.ID, "nodes-section")
    wait(browser, "fresh data", lambda: "stale" not in classes(section))
    fleet.redis.pause()
    try:
        wait(browser, "the banner", lambda: shown(browser, "banner"))
        assert "unreachable" in browser.find_element(By.ID, "banner").text
        assert "stale" in classes(section)
        assert "stale" in section.find_element(By.CSS_SELECTOR, ".stale-note").text
        assert node_rows(browser) == 2  # the last data, kept
        # This replica's own receipts do not need the store.
        assert "stale" not in classes(browser.find_element(By.ID, "receipts-section"))
    finally:
        fleet.redis.resume()
    wait(browser, "the banner gone", lambda: not shown(browser, "banner"))
    assert "stale" not in classes(section)
    assert "Traceback" not in fleet.gateway.output()


@pytest.mark.parametrize("closed", [False, True], ids=["admin-key", "admin-and-client-keys"])
def test_the_page_asks_for_the_admin_key(fleet: Fleet, browser: Chrome, closed: bool) -> None:
    """With --admin-key the page's own reads want the key, even on loopback; on a closed API
    (client keys too) so do the node status reads, and the page shows nothing without it."""
    client_keys = ["--api-key", CLIENT_KEY] if closed else []
    guarded = Gateway(
        "--redis-url", fleet.redis.url, "--admin-key", ADMIN_KEY, *client_keys, name="ui-key"
    )
    try:
        browser.get(f"{guarded.url}/ui")  # the page itself loads for anyone
        wait(browser, "the key prompt", lambda: shown(browser, "auth"))
        assert "admin key" in browser.find_element(By.ID, "auth-message").text
        assert "no data" in browser.find_element(By.ID, "receipts").text
        if closed:
            assert node_rows(browser) == 0

        field = browser.find_element(By.ID, "key-input")
        field.send_keys("not-the-key", Keys.ENTER)
        wait(browser, "the refusal", lambda: shown(browser, "key-error"))
        assert "invalid" in browser.find_element(By.ID, "key-error").text
        assert "no data" in browser.find_element(By.ID, "receipts").text

        field.send_keys(ADMIN_KEY, Keys.ENTER)
        wait(browser, "no prompt", lambda: not shown(browser, "auth"))
        wait(browser, "the nodes", lambda: node_rows(browser) == 2)
        assert browser.find_element(By.ID, "leader").text == "ui-checker"
        assert browser.execute_script("return sessionStorage.length") == 1
        browser.refresh()  # the key is kept for the tab
        wait(browser, "the nodes again", lambda: node_rows(browser) == 2)
        assert not shown(browser, "auth")
    finally:
        guarded.close()
