"""compose.yaml, the Dockerfile and deploy/haproxy.cfg, checked without a Docker engine.

- a real compose parser (Debian's ``docker-compose``, installed by ``.ci/run``) validates the
  file, with every profile;
- every fleetgate service's command and ``FLEETGATE_*`` environment is parsed by the very code
  the container runs, and every ``<service>:<port>`` reference names a service on its port;
- the Dockerfile's entry point is the ``fleetgate`` command and its build context (after
  ``.dockerignore``) holds what it copies;
- the mirror: every service of compose.yaml runs as a local process on loopback with its own
  command and environment (host names and ports mapped), in ``depends_on`` order, waiting on
  its healthcheck; the openai SDK goes through every gateway replica, both health-checkers
  run with one leader, and a node added with the ops script reaches every replica;
- with ``haproxy`` on PATH, deploy/haproxy.cfg (ports mapped) fronts the mirrored replicas.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway.checker import health_checker as checker
from gateway.cli import COMMANDS
from gateway.replica import settings
from gateway.sim import node as simnode
from tests.fleet import ROOT, Process, SimNode
from tests.support import free_port, wait_for_port

COMPOSE = ROOT / "compose.yaml"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
IMAGE = "fleetgate"
MODEL = "sim-model"
CHAT = [{"role": "user", "content": "hello"}]

# The variables each fleetgate command reads (FLEETGATE_CONFIG: a TOML file of options).
ENV_OF_COMMAND: dict[str, set[str]] = {
    "serve": {o.env for o in settings.OPTIONS} | {"FLEETGATE_CONFIG"},
    "health-checker": {o.env for o in checker.OPTIONS} | {"FLEETGATE_CONFIG"},
    "sim-node": set(),
    "nodes": {"FLEETGATE_REDIS_URL", "FLEETGATE_PREFIX"},
    "keys": {"FLEETGATE_REDIS_URL", "FLEETGATE_PREFIX"},
}
# Where each long-running command takes its listening port: flag, variable, default.
LISTEN: dict[str, tuple[str, str | None, int]] = {
    "serve": ("--port", "FLEETGATE_PORT", 8000),
    "health-checker": ("--metrics-port", "FLEETGATE_METRICS_PORT", 0),
    "sim-node": ("--port", None, 8001),
    "redis": ("--port", None, 6379),
}
REFERENCE = re.compile(r"(?<![\w.-])([A-Za-z0-9][\w.-]*):(\d+)(?!\d)")


# -- reading the files ----------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def is_fleetgate(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).split(":")[0] == IMAGE


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> set[str]:
    return set(service.get("depends_on") or ())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest.strip()))
    return steps


def final_stage(instruction: str) -> str:
    """The arguments of the last ``instruction`` in the Dockerfile's final stage."""
    steps = dockerfile()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    found = [rest for word, rest in steps[last_from:] if word == instruction]
    assert found, f"no {instruction} in the Dockerfile's final stage"
    return found[-1]


def exec_form(instruction: str) -> list[str]:
    value: list[str] = json.loads(final_stage(instruction))
    return value


def command_of(service: dict[str, Any]) -> list[str]:
    """The fleetgate sub-command line a fleetgate service runs (after ENTRYPOINT)."""
    assert "entrypoint" not in service, "the mirror runs the image's entry point"
    return [str(a) for a in service.get("command") or exec_form("CMD")]


def kind_of(service: dict[str, Any]) -> str:
    if str(service.get("image", "")).startswith("redis"):
        return "redis"
    if str(service.get("image", "")).startswith("haproxy"):
        return "haproxy"
    return command_of(service)[0]


def flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def listen_port(service: dict[str, Any]) -> int | None:
    """The port the service listens on inside its container; None if it serves nothing."""
    kind = kind_of(service)
    if kind not in LISTEN:
        return None
    flag, variable, default = LISTEN[kind]
    args = [str(a) for a in service.get("command") or ()]
    text = flag_value(args, flag)
    if text is None and variable:
        text = environment(service).get(variable)
    port = int(text) if text is not None else default
    return port or None


# -- static checks --------------------------------------------------------------------------


def test_compose_file_is_valid() -> None:
    """A real compose parser accepts the file, with and without the optional profiles."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's)")
    services = load_compose()["services"]
    names = sorted({p for s in services.values() for p in s.get("profiles") or ()})
    assert {"l4", "ops"} <= set(names)
    every = [arg for name in names for arg in ("--profile", name)]
    for profiles in ([], *(["--profile", name] for name in names), every):
        done = subprocess.run(
            [exe, "-f", str(COMPOSE), *profiles, "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"docker-compose {profiles}: {done.stderr}"
    listed = subprocess.run(
        [exe, "-f", str(COMPOSE), *every, "config", "--services"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert set(listed.stdout.split()) == set(services)


def test_compose_services_are_configured_as_their_commands_expect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each fleetgate service's command line and FLEETGATE_* variables are parsed by the code
    the container runs; references to other services use their ports."""
    compose = load_compose()
    services: dict[str, dict[str, Any]] = compose["services"]
    for key in [k for k in os.environ if k.startswith("FLEETGATE_")]:
        monkeypatch.delenv(key)
    kinds = [kind_of(s) for s in services.values()]
    assert kinds.count("redis") == 1
    assert kinds.count("sim-node") == 3 and kinds.count("serve") == 3
    assert kinds.count("health-checker") == 2
    for name, service in services.items():
        env = environment(service)
        if not is_fleetgate(service):
            assert not [k for k in env if k.startswith("FLEETGATE_")], name
            continue
        args = command_of(service)
        assert args[0] in COMMANDS, f"{name}: unknown fleetgate command {args[0]!r}"
        unknown = sorted(k for k in env if k not in ENV_OF_COMMAND[args[0]])
        assert not unknown, f"{name} ({args[0]}): variables it does not read: {unknown}"
        if args[0] == "serve":
            loaded = settings.load_settings(args[1:], environ=env)
            assert loaded.redis_url and loaded.node and loaded.replica_id == name
            assert loaded.host == "0.0.0.0"
        elif args[0] == "health-checker":
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            loaded_checker = checker.load_settings(args[1:])
            assert loaded_checker.checker_id == name and loaded_checker.metrics_port
            assert loaded_checker.metrics_host == "0.0.0.0"
        elif args[0] == "sim-node":
            assert simulated_config(monkeypatch, args[1:]).host == "0.0.0.0"
    # <service>:<port> anywhere in commands and environments names a service on its port.
    ports = {name: listen_port(s) for name, s in services.items()}
    for name, service in services.items():
        texts = [*(str(a) for a in service.get("command") or ()), *environment(service).values()]
        for text in texts:
            for host, port in REFERENCE.findall(text):
                if host in services:
                    assert int(port) == ports[host], f"{name}: {host}:{port} is not its port"
    # Published ports lead to the port each service listens on, and do not clash.
    published: list[str] = []
    for name, service in services.items():
        for mapping in service.get("ports") or ():
            host_port, _, container_port = str(mapping).rpartition(":")
            published.append(host_port)
            if kind_of(service) != "haproxy":
                assert int(container_port) == ports[name], f"{name}: publishes {mapping}"
    assert len(published) == len(set(published)), published
    # Self-registration is allowed from the compose network.
    subnets = [
        ipaddress.ip_network(c["subnet"]) for c in compose["networks"]["default"]["ipam"]["config"]
    ]
    for name, service in services.items():
        for cidr in environment(service).get("FLEETGATE_REGISTER_ALLOW", "").split(","):
            if cidr:
                network = ipaddress.ip_network(cidr)
                assert any(network.overlaps(s) for s in subnets), f"{name}: {cidr}"
    # HAProxy's backend is exactly the gateway replicas, on their ports.
    servers = set(re.findall(r"^\s*server\s+\S+\s+(\S+:\d+)", HAPROXY_CFG.read_text(), re.M))
    gateways = {f"{n}:{ports[n]}" for n, s in services.items() if kind_of(s) == "serve"}
    assert servers == gateways


def simulated_config(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> simnode.SimConfig:
    """Run the sim node's own argument handling, stopping where it would start serving."""
    seen: list[simnode.SimConfig] = []

    async def fake_serve(config: simnode.SimConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(simnode, "serve", fake_serve)
    assert simnode.main(argv) == 0
    return seen[0]


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or a parent wins."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out += pattern[i : end + 1]
                i = end + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        compiled = regex(pattern.lstrip("!").strip("/"))
        if any(compiled.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_runs_fleetgate_as_non_root_from_a_small_context() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert exec_form("ENTRYPOINT") == ["fleetgate"]
    assert pyproject["project"]["scripts"]["fleetgate"] == "gateway.cli:main"
    cmd = exec_form("CMD")
    assert cmd[0] in COMMANDS and flag_value(cmd, "--host") == "0.0.0.0"
    default_port = next(o for o in settings.OPTIONS if o.name == "port").default
    assert final_stage("EXPOSE") == str(default_port)
    user = final_stage("USER").split(":")[0]
    assert user not in {"root", "0"}
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: list[str] = []
    for word, rest in dockerfile():
        if word == "COPY" and not rest.startswith("--from"):
            copied += rest.split()[:-1]
    found = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in found}
    needed = [*sorted(packages), pyproject["project"]["readme"]]
    assert {"pyproject.toml", "scripts", *needed} <= set(copied)
    for source in copied:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not dockerignore_excludes(relative, patterns), relative
    for kept_out in (".git/HEAD", "tests/test_compose.py", ".venv/bin/python", "compose.yaml"):
        assert dockerignore_excludes(kept_out, patterns), kept_out
    assert dockerignore_excludes("gateway/__pycache__/app.cpython-311.pyc", patterns)


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
    # HAProxy (profile l4) has its own mirror, in its test.
    fleet.services = {
        name: mirror(fleet, name, s) for name, s in services.items() if kind_of(s) != "haproxy"
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
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{fleet.logs()}")
        time.sleep(0.05)


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=20)


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
        until(lambda url=url: registered(url), 15, f"{gateway.name} to register nodes", fleet)
        assert httpx.get(f"{url}/health", timeout=5).json()["replica"] == gateway.name

    # The openai SDK, plain and streaming, through every replica.
    for gateway in gateways:
        client = sdk(fleet.url(gateway.name))
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=3,
        )
        content = raw.parse().choices[0].message.content
        assert content is not None and content.split() == ["tok0", "tok1", "tok2"]
        assert raw.headers["x-fleetgate-node"] in nodes
        stream = client.chat.completions.create(
            model=MODEL,
            messages=CHAT,  # type: ignore[arg-type]
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
        client = sdk(fleet.url(gateway.name))

        def listed(client: openai.OpenAI = client) -> bool:
            return "extra-model" in {m.id for m in client.models.list().data}

        until(listed, 10, f"{gateway.name} to list extra-model", fleet)
        raw = client.chat.completions.with_raw_response.create(
            model="extra-model",
            messages=CHAT,  # type: ignore[arg-type]
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
        client = sdk(front)
        chat = client.chat.completions.create(
            model=MODEL,
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=2,
        )
        assert chat.choices[0].message.content
        client.close()
    finally:
        balancer.close()
