"""Real inference engines on this machine, for tests and benchmarks: build, make models, start.

    python scripts/engines.py build llama            # llama-server at the pinned llama.cpp
    python scripts/engines.py model llama-tiny       # or llama-big: a random-weight GGUF
    python scripts/engines.py start llama --port 8081 [--model llama-tiny] [--parallel 2]
    python scripts/engines.py env [llama]            # shell assignments of what is prepared

Everything is cached under ``$FLEETGATE_ENGINES_CACHE`` (default ``~/.cache/fleetgate/engines``),
keyed by the pinned version, and made only when missing. ``build`` and ``model`` print the
path of what they prepared on stdout, progress on stderr. ``start`` prepares what is missing,
then becomes the engine (exec): its signals and exit status are the engine's own. A step that
cannot be done here (no compiler, no network) exits with status 1 and one line saying why.

Engines other than llama (vLLM) live in their own module of ``scripts/engine``, which offers
the same functions: ``build(progress)`` (the path of its Python), ``environment()``,
``model(name, progress)`` with the names it serves in ``MODELS`` (the first is the default),
and ``start_command(python, model, port, served_name=, host=)`` giving the command line and
its whole environment.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn, cast

# Run as a file, Python puts scripts/ on sys.path, not the repository root above it that holds
# the scripts package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.engine import cache, gguf_model, llama

ENGINES = ("llama", "vllm")


def _module(engine: str) -> ModuleType:
    try:
        return importlib.import_module(f"scripts.engine.{engine}")
    except ModuleNotFoundError as exc:
        raise cache.EngineUnavailable(f"engine {engine}: {exc}") from None


def _function(engine: str, name: str) -> Callable[..., Any]:
    found = getattr(_module(engine), name, None)
    if not callable(found):
        raise cache.EngineUnavailable(f"engine {engine} offers no {name}()")
    return cast(Callable[..., Any], found)


def _model(name: str) -> Path:
    if name in gguf_model.SPECS:
        return llama.model(name)
    for engine in ENGINES[1:]:
        try:
            module = _module(engine)
        except cache.EngineUnavailable:
            continue
        if name in getattr(module, "MODELS", ()):
            made: Path = _function(engine, "model")(name, cache.say)
            return made
    raise cache.EngineUnavailable(f"unknown model {name!r} (llama: {', '.join(gguf_model.SPECS)})")


def _environment(engine: str) -> dict[str, str]:
    """What is prepared, as variables; only what exists (nothing is built here)."""
    if engine != "llama":
        found: dict[str, str] = _function(engine, "environment")()
        return found
    env = {cache.ENV_VAR: str(cache.root())}
    if llama.binary_path().is_file():
        env["FLEETGATE_LLAMA_SERVER"] = str(llama.binary_path())
    if (llama.source_dir() / "models" / gguf_model.VOCAB_FILE).is_file():
        vocab = llama.source_dir() / "models" / gguf_model.VOCAB_FILE
        for name, spec in gguf_model.SPECS.items():
            path = gguf_model.path_of(spec, vocab)
            if path.is_file():
                env[f"FLEETGATE_MODEL_{name.upper().replace('-', '_')}"] = str(path)
    return env


def _start(args: argparse.Namespace) -> NoReturn:
    env = dict(os.environ)
    if args.engine != "llama":
        module = _module(args.engine)
        python: Path = _function(args.engine, "build")(cache.say)
        name = args.model or module.MODELS[0]
        folder: Path = _function(args.engine, "model")(name, cache.say)
        command, env = _function(args.engine, "start_command")(
            python, folder, args.port, served_name=name, host=args.host
        )
    else:
        name = args.model or "llama-tiny"
        command = llama.server_command(
            llama.build(),
            llama.model(name),
            port=args.port,
            alias=name,
            host=args.host,
            parallel=args.parallel,
            slot_context=args.slot_context,
            threads=args.threads,
        )
    cache.say(f"engines: {shlex.join(command)}")
    sys.stdout.flush()
    try:
        os.execve(command[0], command, env)
    except OSError as exc:
        raise cache.EngineUnavailable(f"cannot start {command[0]}: {exc.strerror}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/engines.py",
        description="Build, prepare and start real inference engines for tests and benchmarks.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build an engine (once per pinned version)")
    build.add_argument("engine", choices=ENGINES)
    model = sub.add_parser("model", help="make a model (once per parameters)")
    model.add_argument("name", help=f"llama: {', '.join(gguf_model.SPECS)}")
    start = sub.add_parser("start", help="start an engine in the foreground")
    start.add_argument("engine", choices=ENGINES)
    start.add_argument("--port", type=_positive, required=True)
    start.add_argument("--host", default="127.0.0.1")
    start.add_argument(
        "--model", default=None, help="default: llama-tiny for llama, vllm-tiny for vllm"
    )
    start.add_argument("--parallel", type=_positive, default=llama.DEFAULT_PARALLEL, help="slots")
    start.add_argument(
        "--slot-context", type=_positive, default=llama.DEFAULT_SLOT_CONTEXT, help="tokens/slot"
    )
    start.add_argument("--threads", type=_positive, default=None, help="default: the engine's")
    env = sub.add_parser("env", help="print shell assignments of what is prepared")
    env.add_argument("engine", nargs="?", choices=ENGINES, default="llama")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "build":
            built: Path = (
                llama.build()
                if args.engine == "llama"
                else _function(args.engine, "build")(cache.say)
            )
            print(built)
        elif args.command == "model":
            print(_model(args.name))
        elif args.command == "start":
            _start(args)
        else:
            for key, value in _environment(args.engine).items():
                print(f"{key}={shlex.quote(value)}")
    except cache.EngineUnavailable as exc:
        print(f"engines: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("engines: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
