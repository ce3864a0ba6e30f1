"""compose.yaml and deploy/haproxy.cfg run without a Docker engine (the static checks of
compose.yaml and the Dockerfile: tests/unit/test_compose.py).

- a real compose parser (Debian's ``docker-compose``, installed by ``.ci/run``) validates the
  file, with every profile;
- the mirror: every service of compose.yaml runs as a local process on loopback with its own
  command and environment (host names and ports mapped), in ``depends_on`` order, waiting on
  its healthcheck; the openai SDK goes through every gateway replica, both health-checkers
  run with one leader, and a node added with the ops script reaches every replica;
- with ``haproxy`` on PATH, deploy/haproxy.cfg (ports mapped) fronts the mirrored replicas;
- with ``prometheus`` on PATH (profile observability), deploy/prometheus.yml (addresses mapped)
  scrapes every mirrored replica, checker and node, and every expression of the Grafana
  dashboard evaluates on what it scraped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support import MODEL, ROOT
from tests.support.clients import sdk
from tests.support.compose import (
    COMPOSE,
    DASHBOARD,
    HAPROXY_CFG,
    LISTEN,
    PROMETHEUS_YML,
    REFERENCE,
    command_of,
    depends_on,
    environment,
    flag_value,
    is_fleetgate,
    kind_of,
    listen_port,
    load_compose,
)
from tests.support.harness import free_port, wait_for_port
from tests.support.polling import wait_until
from tests.support.processes import Process, SimNode
from tests.support.prometheus import GRAFANA_VARIABLES, dashboard_expressions

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


# -- validated by a compose parser ----------------------------------------------------------


def test_compose_file_is_valid() -> None:
    """A real compose parser accepts the file, with and without the optional profiles."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's)")
    services = load_compose()["services"]
    names = sorted({p for s in services.values() for p in s.get("profiles") or ()})
    assert {"l4", "ops", "observability"} <= set(names)
    every = [arg for name in names for arg in ("--profile", name)]
    # Every check at once: each is a Python start-up of docker-compose's own.
    checks = [
        (
            profiles,
            subprocess.Popen(
                [exe, "-f", str(COMPOSE), *profiles, "config", "-q"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for profiles in ([], *(["--profile", name] for name in names), every)
    ]
    listing = subprocess.Popen(
        [exe, "-f", str(COMPOSE), *every, "config", "--services"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for profiles, check in checks:
            _, errors = check.communicate(timeout=60)
            assert check.returncode == 0, f"docker-compose {profiles}: {errors}"
        listed, errors = listing.communicate(timeout=60)
        assert listing.returncode == 0, errors
    finally:
        for process in (*(check for _, check in checks), listing):
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert set(listed.split()) == set(services)


# -- the mirror: compose.yaml as local processes --------------------------------------------


@dataclass
class Mirrored:
    name: str
    kind: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str] | None
    port: int | None  # on loopback, for the container's listen port
    process: Process | None = None


@dataclass
class Fleet:
    compose: dict[str, Any]
    ports: dict[str, tuple[int, int]]  # service -> (container port, loopback port)
    data_dir: Path
    services: dict[str, Mirrored] = field(default_factory=dict)
    extra: list[Process] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name][1]}"

    def of_kind(self, kind: str) -> list[Mirrored]:
        return [s for s in self.services.values() if s.kind == kind]

    def map_text(self, text: str) -> str:
        """``<service>:<port>`` to its loopback address, ``0.0.0.0`` to ``127.0.0.1``."""

        def replace(match: re.Match[str]) -> str:
            host, port = match.group(1), int(match.group(2))
            if host not in self.ports:
                return match.group(0)
            container, local = self.ports[host]
            assert port == container, f"{host}:{port}: {host} listens on {container}"
            return f"127.0.0.1:{local}"

        return REFERENCE.sub(replace, text).replace("0.0.0.0", "127.0.0.1")

    def logs(self) -> str:
        return "\n".join(
            f"--- {s.name}:\n{s.process.output()[-3000:]}"
            for s in self.services.values()
            if s.process is not None
        )


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag`` set to ``value``: replaced where it is, else appended."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == flag:
            out[i + 1] = value
            return out
        if arg.startswith(flag + "="):
            out[i] = f"{flag}={value}"
            return out
    return [*out, flag, value]


def mirror(fleet: Fleet, name: str, service: dict[str, Any]) -> Mirrored:
    kind = kind_of(service)
    env = {k: fleet.map_text(v) for k, v in environment(service).items()}
    port = fleet.ports[name][1] if name in fleet.ports else None
    if kind == "redis":
        command = [str(a) for a in service.get("command") or ["redis-server"]]
        exe = shutil.which("redis-server")
        assert exe and command[0] == "redis-server", command
        # The volume at /data (redis' working directory) is a temporary directory here.
        argv = [exe, *command[1:], "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(fleet.data_dir)]
    else:
        assert is_fleetgate(service), f"{name}: no mirror for {service.get('image')}"
        # ENTRYPOINT ["fleetgate"] is gateway.cli:main (checked against pyproject above).
        args = [fleet.map_text(a) for a in command_of(service)]
        if kind in LISTEN:
            flag, variable, _ = LISTEN[kind]
            if variable and flag_value(args, flag) is None:
                env[variable] = str(port)
            else:
                args = with_flag(args, flag, str(port))
        argv = [sys.executable, "-m", "gateway.cli", *args]
    healthcheck = None
    test = (service.get("healthcheck") or {}).get("test")
    if test:
        assert isinstance(test, list) and test[0] == "CMD", f"{name}: healthcheck {test}"
        check = [fleet.map_text(str(a)) for a in test[1:]]
        if check[0] == "python":
            check[0] = sys.executable
        elif check[0] == "redis-cli":
            exe = shutil.which("redis-cli")
            assert exe, "redis-cli is not installed"
            check = [exe, "-p", str(port), *check[1:]]
        healthcheck = check
    return Mirrored(name, kind, argv, env, healthcheck, port)


def wait_healthy(service: Mirrored, timeout_s: float = 20.0) -> None:
    """Like ``depends_on: condition: service_healthy``: the healthcheck passes (else the
    port answers)."""
    assert service.process is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not service.process.alive():
            raise AssertionError(f"{service.name} exited:\n{service.process.output()}")
        if service.healthcheck is None:
            if service.port is None:
                return
            try:
                wait_for_port(service.port, timeout_s=0.2)
                return
            except TimeoutError:
                continue
        done = subprocess.run(
            service.healthcheck,
            env={**os.environ, **service.env},
            capture_output=True,
            timeout=10,
        )
        if done.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{service.name} never became healthy:\n{service.process.output()}")


def plan_fleet(data_dir: Path) -> Fleet:
    """Every service's mirror: a loopback port for each listening one, then its command."""
    compose = load_compose()
    services: dict[str, dict[str, Any]] = compose["services"]
    ports: dict[str, tuple[int, int]] = {}
    for name, service in services.items():
        container_port = listen_port(service)
        if container_port is not None:
            ports[name] = (container_port, free_port())
    fleet = Fleet(compose, ports, data_dir)
    # HAProxy (profile l4) and Prometheus (profile observability) have their own mirrors, in
    # their tests; Grafana has none (tests/e2e/test_dashboard.py checks what it queries).
    fleet.services = {
        name: mirror(fleet, name, s)
        for name, s in services.items()
        if kind_of(s) not in ("haproxy", "prometheus", "grafana")
    }
    return fleet


def start_fleet(fleet: Fleet) -> None:
    """Like `docker compose up`: the services without profiles, each after its depends_on."""
    services: dict[str, dict[str, Any]] = fleet.compose["services"]
    pending = {name for name, s in services.items() if not s.get("profiles")}
    started: set[str] = set()
    while pending:
        wave = sorted(n for n in pending if depends_on(services[n]) <= started)
        assert wave, f"depends_on cycle or a dependency in a profile: {sorted(pending)}"
        for name in wave:
            service = fleet.services[name]
            service.process = Process(service.argv, f"compose-{name}", service.env)
        for name in wave:
            wait_healthy(fleet.services[name])
        started |= set(wave)
        pending -= set(wave)


def stop_fleet(fleet: Fleet) -> None:
    for process in fleet.extra:
        process.close()
    for service in reversed(list(fleet.services.values())):
        if service.process is not None:
            service.process.close()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with tempfile.TemporaryDirectory(prefix="fleetgate-compose-") as data_dir:
        planned = plan_fleet(Path(data_dir))
        try:
            start_fleet(planned)
            yield planned
        finally:
            stop_fleet(planned)


def until(check: Callable[[], bool], timeout_s: float, what: str, fleet: Fleet) -> None:
    """Wait for ``check``; if it never holds, fail with every service's log."""
    if not wait_until(check, timeout_s, interval_s=0.05):
        raise AssertionError(f"timed out waiting for {what}\n{fleet.logs()}")


def test_compose_fleet_runs_as_local_processes(fleet: Fleet) -> None:
    gateways = fleet.of_kind("serve")
    nodes = {fleet.url(s.name) for s in fleet.of_kind("sim-node")}
    assert len(gateways) == 3 and len(nodes) == 3

    # Every replica registered the FLEETGATE_NODE list (host names mapped) and is ready.
    def registered(url: str) -> bool:
        status = httpx.get(f"{url}/nodes/status", timeout=5).json()
        ready = httpx.get(f"{url}/ready", timeout=5).status_code == 200
        return ready and nodes <= set(status)

    for gateway in gateways:
        url = fleet.url(gateway.name)

        def registered_here(url: str = url) -> bool:
            return registered(url)

        until(registered_here, 15, f"{gateway.name} to register nodes", fleet)
        assert httpx.get(f"{url}/health", timeout=5).json()["replica"] == gateway.name

    # The openai SDK, plain and streaming, through every replica.
    for gateway in gateways:
        client = sdk(fleet.url(gateway.name), timeout=20)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=3,
        )
        content = raw.parse().choices[0].message.content
        assert content is not None and content.split() == ["tok0", "tok1", "tok2"]
        assert raw.headers["x-fleetgate-node"] in nodes
        stream = client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=4,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces).split() == [f"tok{i}" for i in range(4)]
        client.close()

    # Both health-checkers run; exactly one leads.
    checkers = fleet.of_kind("health-checker")
    assert len(checkers) == 2

    def one_leader() -> bool:
        states = [httpx.get(f"{fleet.url(c.name)}/health", timeout=5).json() for c in checkers]
        assert {s["checker"] for s in states} == {c.name for c in checkers}
        return sorted(s["leader"] for s in states) == [False, True]

    until(one_leader, 10, "one leading health-checker", fleet)

    # A fourth node, added with the ops script in the ops service's environment.
    extra = SimNode("--model", "extra-model", "--tokens-per-s", "0", name="compose-extra")
    fleet.extra.append(extra)
    ops = fleet.services["ops"]
    added = subprocess.run(
        [sys.executable, "scripts/nodes.py", "add", extra.url, "--model", "extra-model"],
        cwd=ROOT,
        env={**os.environ, **ops.env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert added.returncode == 0, f"scripts/nodes.py add: {added.stdout}{added.stderr}"
    for gateway in gateways:
        client = sdk(fleet.url(gateway.name), timeout=20)

        def listed(client: openai.OpenAI = client) -> bool:
            return "extra-model" in {m.id for m in client.models.list().data}

        until(listed, 10, f"{gateway.name} to list extra-model", fleet)
        raw = client.chat.completions.with_raw_response.create(
            model="extra-model",
            messages=CHAT,
            max_tokens=2,
        )
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-fleetgate-node"] == extra.url
        client.close()

    # The ops service's own command (`fleetgate nodes list`) sees the fleet too.
    listing = subprocess.run(
        ops.argv,
        cwd=ROOT,
        env={**os.environ, **ops.env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listing.returncode == 0, listing.stderr
    assert extra.url in listing.stdout and nodes <= set(listing.stdout.split())

    # Redis runs with append-only persistence into its (mapped) volume.
    assert list(fleet.data_dir.glob("appendonly*")), sorted(fleet.data_dir.iterdir())


def test_haproxy_example_fronts_the_replicas(fleet: Fleet, tmp_path: Path) -> None:
    """deploy/haproxy.cfg, with addresses mapped to the mirror: TCP round-robin over the
    replicas, each passing the HTTP check on /ready."""
    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("haproxy is not installed (optional: apt-get install haproxy)")
    checked = subprocess.run(
        [exe, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    service = fleet.compose["services"]["haproxy"]
    assert service["profiles"] == ["l4"]
    published = {int(str(p).rpartition(":")[2]): free_port() for p in service["ports"]}
    text = HAPROXY_CFG.read_text()
    # Docker's DNS is not here: drop the resolvers section and its use.
    text = re.sub(r"^resolvers docker\n(?:[ \t]+.*\n)*", "", text, flags=re.M)
    text = text.replace(" resolvers docker", "")
    for container_port, local in published.items():
        text = re.sub(rf"bind :{container_port}\b", f"bind 127.0.0.1:{local}", text)
    config = tmp_path / "haproxy.cfg"
    config.write_text(fleet.map_text(text))
    balancer = Process([exe, "-db", "-f", str(config)], "compose-haproxy")
    try:
        front = f"http://127.0.0.1:{published[8000]}"
        stats = f"http://127.0.0.1:{published[8404]}/;csv"
        try:
            wait_for_port(published[8404])
        except TimeoutError:
            raise AssertionError(f"haproxy did not start:\n{balancer.output()}") from None

        def all_checked_ok() -> bool:
            rows = [r.split(",") for r in httpx.get(stats, timeout=5).text.splitlines()]
            states = {r[1]: (r[17], r[36]) for r in rows[1:] if r[0] == "gateways"}
            names = {s.name for s in fleet.of_kind("serve")}
            return all(states.get(n, ("", ""))[0] == "UP" for n in names) and all(
                states[n][1].startswith("L7OK") for n in names
            )

        until(all_checked_ok, 15, "haproxy to check every replica", fleet)
        # A new connection each time: round-robin reaches every replica.
        seen = {httpx.get(f"{front}/health", timeout=5).json()["replica"] for _ in range(6)}
        assert seen == {s.name for s in fleet.of_kind("serve")}
        client = sdk(front, timeout=20)
        chat = client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=2,
        )
        assert chat.choices[0].message.content
        client.close()
    finally:
        balancer.close()


def test_prometheus_scrapes_the_fleet_for_the_dashboard(fleet: Fleet, tmp_path: Path) -> None:
    """deploy/prometheus.yml, addresses mapped to the mirror and scraping every second: every
    target is up, and every expression of deploy/grafana/fleetgate.json evaluates, the
    requests sent through the replicas among the answers."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    assert fleet.compose["services"]["prometheus"]["profiles"] == ["observability"]
    text = re.sub(r"scrape_interval: \S+", "scrape_interval: 1s", PROMETHEUS_YML.read_text())
    config = tmp_path / "prometheus.yml"
    config.write_text(fleet.map_text(text))
    port = free_port()
    argv = [exe, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}"]
    argv.append(f"--storage.tsdb.path={tmp_path / 'data'}")
    server = Process(argv, "compose-prometheus")
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        try:
            wait_for_port(port, timeout_s=30)
        except TimeoutError:
            raise AssertionError(f"prometheus did not start:\n{server.output()}") from None
        client = sdk(fleet.url(fleet.of_kind("serve")[0].name), timeout=20)
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
        client.close()
        scraped = {
            f"127.0.0.1:{fleet.ports[s.name][1]}"
            for s in fleet.services.values()
            if s.kind in ("serve", "health-checker", "sim-node")
        }

        def every_target_up() -> bool:
            targets = httpx.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
            return {t["labels"]["instance"] for t in targets if t["health"] == "up"} == scraped

        until(every_target_up, 30, f"prometheus to scrape every target\n{server.output()}", fleet)

        def query(expr: str) -> list[dict[str, Any]]:
            answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=10).json()
            assert answer["status"] == "success", f"{expr}: {answer}"
            result: list[dict[str, Any]] = answer["data"]["result"]
            return result

        until(
            lambda: bool(query("sum(fleetgate_requests_total)")),
            10,
            "the requests in Prometheus",
            fleet,
        )
        variables = {**GRAFANA_VARIABLES, "$replica": ".*"}
        answered = [expr for expr in dashboard_expressions(DASHBOARD, variables) if query(expr)]
        assert len(answered) >= 10, answered
    finally:
        server.close()
