"""The ``fleetgate`` command: one entry point for every process fleetgate runs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

USAGE = """usage: fleetgate COMMAND [options]

commands:
  serve           run one gateway replica (hypercorn + Starlette)
  health-checker  probe nodes, mark health, deregister dead ones (one leads, others stand by)
  nodes           add | remove | drain | list | set nodes, straight through Redis
  keys            add | revoke | list client API keys, straight through Redis
  sim-node        run a simulated OpenAI-compatible LLM node
  demo            start a whole fleet on this machine: store, simulated nodes, gateway

Run "fleetgate COMMAND --help" for the options of a command."""


def _serve(argv: Sequence[str]) -> int:
    from gateway.replica.server import main

    return main(argv)


def _checker(argv: Sequence[str]) -> int:
    from gateway.checker.health_checker import main

    return main(argv)


def _nodes(argv: Sequence[str]) -> int:
    from gateway.ops.admin import main

    return main("nodes", argv)


def _keys(argv: Sequence[str]) -> int:
    from gateway.ops.admin import main

    return main("keys", argv)


def _sim_node(argv: Sequence[str]) -> int:
    from gateway.sim.node import main

    return main(list(argv))


def _demo(argv: Sequence[str]) -> int:
    from .demo import main

    return main(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "serve": _serve,
    "health-checker": _checker,
    "nodes": _nodes,
    "keys": _keys,
    "sim-node": _sim_node,
    "demo": _demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"fleetgate: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
