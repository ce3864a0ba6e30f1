"""compose.yaml and the Dockerfile read as Docker would: each service's kind, command line,
environment and listening port, and the instructions of the image's final stage."""

from __future__ import annotations

import json
import re
from typing import Any

# PyYAML has no inline types, and its stubs (types-PyYAML) are not a test dependency.
import yaml  # type: ignore[import-untyped]

from tests.support import ROOT

COMPOSE = ROOT / "compose.yaml"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "fleetgate.json"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
# The images that are not fleetgate's, and where the observability ones listen by default.
OTHER_IMAGES = ("redis", "haproxy", "prom/prometheus", "grafana/grafana")
IMAGE_PORTS = {"prometheus": 9090, "grafana": 3000}
IMAGE = "fleetgate"
# Where each long-running command takes its listening port: flag, variable, default.
LISTEN: dict[str, tuple[str, str | None, int]] = {
    "serve": ("--port", "FLEETGATE_PORT", 8000),
    "health-checker": ("--metrics-port", "FLEETGATE_METRICS_PORT", 0),
    "sim-node": ("--port", None, 8001),
    "redis": ("--port", None, 6379),
}
# ``<service>:<port>`` in a command line or a variable.
REFERENCE = re.compile(r"(?<![\w.-])([A-Za-z0-9][\w.-]*):(\d+)(?!\d)")


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
    """``serve``, ``health-checker``, ... for fleetgate's image; else the image's name, the
    registry's namespace left out (``redis``, ``haproxy``, ``prometheus``, ``grafana``)."""
    image = str(service.get("image", "")).split(":")[0]
    if image in OTHER_IMAGES:
        return image.rpartition("/")[2]
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
    if kind in IMAGE_PORTS:
        return IMAGE_PORTS[kind]
    if kind not in LISTEN:
        return None
    flag, variable, default = LISTEN[kind]
    args = [str(a) for a in service.get("command") or ()]
    text = flag_value(args, flag)
    if text is None and variable:
        text = environment(service).get(variable)
    port = int(text) if text is not None else default
    return port or None
