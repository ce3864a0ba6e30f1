"""Options from flags, ``FLEETGATE_*`` environment variables and an optional TOML file.

One table of :class:`Option` builds the argument parser and reads the environment, so a
flag and its variable can never disagree. Precedence: flag, then environment, then file,
then the default. This is the only module that reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tomllib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

ENV_PREFIX = "FLEETGATE_"


class ConfigError(Exception):
    """An invalid option value; the message is the one line start-up stops with."""


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: ``--name`` flag, ``FLEETGATE_NAME`` variable, ``name`` key in the file."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    repeatable: bool = False
    flag_only: bool = False
    aliases: tuple[str, ...] = ()  # other flag names for the same setting (LMDeploy's)
    list_alias: str | None = None  # a flag taking several values at once: --api-keys a b
    extra_env: tuple[str, ...] = ()  # other variables read after FLEETGATE_* (SSL_CERTFILE)
    switch: bool = False  # a flag without a value: present means true

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser(prog: str, description: str, options: Sequence[Option]) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--config", help="TOML file of options (keys as the flags, with _)")
    for opt in options:
        env = "" if opt.flag_only else f" [env {opt.env}]"
        default = "" if opt.default in (None, (), "") else f" (default: {opt.default})"
        flags = [f"--{name}" for name in (opt.name, *opt.aliases)]
        if opt.switch:
            parser.add_argument(
                *flags,
                dest=opt.dest,
                action="store_const",
                const="true",
                default=None,
                help=f"{opt.help}{env}",
            )
            continue
        parser.add_argument(
            *flags,
            dest=opt.dest,
            action="append" if opt.repeatable else "store",
            default=None,
            help=f"{opt.help}{default}{env}",
        )
        if opt.list_alias:
            parser.add_argument(
                f"--{opt.list_alias}",
                dest=opt.dest,
                action="extend",
                nargs="+",
                help=f"the same as --{opt.name}, several at once",
            )
    return parser


def resolve(
    prog: str,
    description: str,
    options: Sequence[Option],
    argv: Sequence[str] | None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Return every option's value by ``dest``; raise :class:`ConfigError` on a bad one."""
    environ = os.environ if environ is None else environ
    parser = build_parser(prog, description, options)
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    file_values: dict[str, Any] = {}
    config_path = args.config or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        try:
            file_values = tomllib.loads(Path(config_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_path}: {exc}") from None
        known = {o.dest for o in options}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) in {config_path}: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for opt in options:
        raw: Any = getattr(args, opt.dest)
        source = f"--{opt.name}"
        # An empty variable counts as unset, as compose's ${VAR:-} gives when VAR is not set.
        env_name = next(
            (name for name in (opt.env, *opt.extra_env) if environ.get(name, "").strip()), None
        )
        if raw is None and not opt.flag_only and env_name is not None:
            raw = environ[env_name]
            source = env_name
            if opt.repeatable:
                raw = [item.strip() for item in raw.split(",") if item.strip()]
        if raw is None and opt.dest in file_values:
            raw = file_values[opt.dest]
            source = f"{opt.dest} in {config_path}"
            if opt.repeatable and not isinstance(raw, list):
                raw = [raw]
            raw = [str(v) for v in raw] if opt.repeatable else str(raw)
        if raw is None:
            values[opt.dest] = opt.default
            continue
        try:
            if opt.repeatable:
                values[opt.dest] = tuple(opt.parse(str(v)) for v in raw)
            else:
                values[opt.dest] = opt.parse(str(raw))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return values


# -- parsers with readable errors -------------------------------------------------------


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port 0-65535, got {text!r}")
    return value


def int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"expected an integer {low}-{high}, got {text!r}")
        return value

    return parse


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


ARGV_VARIABLE = ENV_PREFIX + "SERVE_ARGV"


def argv_for_workers(argv: Sequence[str]) -> dict[str, str]:
    """Environment that hands a command line to worker processes started by hypercorn."""
    import json

    return {ARGV_VARIABLE: json.dumps(list(argv))}


def argv_from_environment() -> list[str]:
    import json

    raw = os.environ.get(ARGV_VARIABLE)
    return list(json.loads(raw)) if raw else []


def otel_environment() -> dict[str, str]:
    """The ``OTEL_*`` variables: OpenTelemetry's SDK reads them itself, fleetgate only asks
    whether they turn tracing on (:mod:`gateway.common.tracing`)."""
    return {name: value for name, value in os.environ.items() if name.startswith("OTEL_")}


def setup_logging(level: str) -> None:
    """One log format for every fleetgate process, on stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def process_id() -> str:
    """A name unique to this process: host name and a random suffix."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
