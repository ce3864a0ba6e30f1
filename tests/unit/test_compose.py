"""compose.yaml and the Dockerfile, checked in-process against the code the containers run
(running them: tests/e2e/test_compose.py).

- every fleetgate service's command and ``FLEETGATE_*`` environment is parsed by the very code
  the container runs, and every ``<service>:<port>`` reference names a service on its port;
- the Dockerfile's entry point is the ``fleetgate`` command and its build context (after
  ``.dockerignore``) holds what it copies;
- the ``observability`` profile: Prometheus scrapes every replica, checker and node on its
  port, Grafana is provisioned with that Prometheus and the dashboard, mounted where each reads.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from typing import Any

import pytest

# PyYAML has no inline types, and its stubs (types-PyYAML) are not a test dependency.
import yaml  # type: ignore[import-untyped]

from gateway.checker import health_checker as checker
from gateway.cli import COMMANDS
from gateway.replica import settings
from gateway.sim import node as simnode
from tests.support import ROOT
from tests.support.compose import (
    DASHBOARD,
    GRAFANA_PROVISIONING,
    HAPROXY_CFG,
    PROMETHEUS_YML,
    REFERENCE,
    command_of,
    dockerfile,
    environment,
    exec_form,
    final_stage,
    flag_value,
    is_fleetgate,
    kind_of,
    listen_port,
    load_compose,
)

# The variables each fleetgate command reads (FLEETGATE_CONFIG: a TOML file of options).
ENV_OF_COMMAND: dict[str, set[str]] = {
    "serve": {o.env for o in settings.OPTIONS} | {"FLEETGATE_CONFIG"},
    "health-checker": {o.env for o in checker.OPTIONS} | {"FLEETGATE_CONFIG"},
    "sim-node": set(),
    "nodes": {"FLEETGATE_REDIS_URL", "FLEETGATE_PREFIX"},
    "keys": {"FLEETGATE_REDIS_URL", "FLEETGATE_PREFIX"},
}


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
    for kept_out in (".git/HEAD", "tests/unit/test_compose.py", ".venv/bin/python", "compose.yaml"):
        assert dockerignore_excludes(kept_out, patterns), kept_out
    assert dockerignore_excludes("gateway/__pycache__/app.cpython-311.pyc", patterns)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts: the container path of each source under the repository."""
    found = {}
    for volume in service.get("volumes") or ():
        source, target = str(volume).split(":")[:2]
        if source.startswith("./"):
            found[target] = source[2:]
            assert (ROOT / source).exists(), f"mounted but missing: {source}"
    return found


def test_observability_profile_scrapes_the_fleet_and_provisions_the_dashboard() -> None:
    services: dict[str, dict[str, Any]] = load_compose()["services"]
    kinds = {name: kind_of(s) for name, s in services.items()}
    profiled = {n for n, s in services.items() if "observability" in (s.get("profiles") or ())}
    assert sorted(kinds[n] for n in profiled) == ["grafana", "prometheus"]
    ports = {name: listen_port(s) for name, s in services.items()}
    prometheus = next(n for n in profiled if kinds[n] == "prometheus")
    grafana = next(n for n in profiled if kinds[n] == "grafana")

    # Prometheus reads deploy/prometheus.yml, which scrapes every replica, checker and node.
    config_file = flag_value([str(a) for a in services[prometheus]["command"]], "--config.file")
    assert mounts(services[prometheus])[str(config_file)] == "deploy/prometheus.yml"
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {
        job["job_name"]: {t for group in job["static_configs"] for t in group["targets"]}
        for job in config["scrape_configs"]
    }

    def of_kind(kind: str) -> set[str]:
        return {f"{n}:{ports[n]}" for n in services if kinds[n] == kind}

    assert jobs == {
        "fleetgate-gateway": of_kind("serve"),
        "fleetgate-checker": of_kind("health-checker"),
        "nodes": of_kind("sim-node"),
    }
    assert all(
        job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"]
    )
    assert set(services[prometheus]["depends_on"]) <= set(services)

    # Grafana: its provisioning, a data source on that Prometheus, the dashboard where the
    # dashboard provider reads and the home dashboard points.
    mounted = mounts(services[grafana])
    assert mounted["/etc/grafana/provisioning"] == GRAFANA_PROVISIONING.relative_to(ROOT).as_posix()
    sources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://{prometheus}:{ports[prometheus]}"
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "fleetgate.yml").read_text())
    folder = providers["providers"][0]["options"]["path"]
    dashboard_path = next(t for t, s in mounted.items() if s == "deploy/grafana/fleetgate.json")
    assert dashboard_path.startswith(folder.rstrip("/") + "/")
    home = environment(services[grafana])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dashboard_path
    assert services[grafana]["depends_on"] == [prometheus]

    # Every panel queries that data source; ids are unique and panels fit the 24-column grid.
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
