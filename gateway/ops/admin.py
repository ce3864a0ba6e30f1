"""Ops commands straight through the store: ``fleetgate nodes …`` and ``fleetgate keys …``
(also ``scripts/nodes.py`` and ``scripts/keys.py``). No gateway needs to be running.

Every command is idempotent, prints a table (or ``--json``), and exits 0 on success, 1 when
the operation could not be done (unknown node or key, drain timed out), 2 on bad input and
3 when the store cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from shared_state import admission as fleet_queue
from shared_state.errors import (
    InvalidInput,
    StateError,
    StoreRefusingWrites,
    StoreUnavailable,
    UnknownKey,
    UnknownNode,
)
from shared_state.key_records import MAX_SHARE, PRIORITIES, UNCAPPED
from shared_state.model import ApiKey, Node, NodeState, NodeStatus, Priority, Role
from shared_state.prefix import MAX_CAPACITY
from shared_state.registry import MAX_INFLIGHT, model_ids, normalize_url
from shared_state.registry_cache import read_restore_record
from shared_state.store import Store

EXIT_FAILED, EXIT_USAGE, EXIT_STORE = 1, 2, 3
ROLES = {"hybrid": Role.HYBRID, "prefill": Role.PREFILL, "decode": Role.DECODE}


KEYS_EPILOG = (
    "Once a key has been added, the gateways' OpenAI API needs a key even after the last one "
    "is revoked: only 'keys open' lets callers without a key in again."
)


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _role(text: str) -> Role:
    key = text.strip().lower()
    if key in ROLES:
        return ROLES[key]
    if key.isdigit() and int(key) in Role._value2member_map_:
        return Role(int(key))
    raise argparse.ArgumentTypeError(f"role must be hybrid, prefill or decode, not {text!r}")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


CACHE_BLOCKS_HELP = (
    "cache_aware: capacity of its prefix cache in gateway blocks (--prefix-block-bytes each, "
    "about 64 tokens): its KV-cache tokens / 64"
)


def _cache_blocks(text: str) -> int:
    """A node's prefix-cache capacity in gateway blocks (cache_aware)."""
    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_CAPACITY:
        raise argparse.ArgumentTypeError(f"expected a whole number 1-{MAX_CAPACITY}, got {text!r}")
    return int(text)


MAX_INFLIGHT_HELP = "requests it runs at once at most, across the fleet"


def _capacity(text: str, least: int) -> int:
    """A node's capacity in requests at once, from ``least`` (0: unlimited) up."""
    if not text.strip().isdigit() or not least <= int(text) <= MAX_INFLIGHT:
        unlimited = " (0: unlimited)" if least == 0 else ""
        raise argparse.ArgumentTypeError(
            f"expected a whole number {least}-{MAX_INFLIGHT}{unlimited}, got {text!r}"
        )
    return int(text)


def _max_inflight(text: str) -> int:
    return _capacity(text, 1)


def _max_inflight_or_unlimited(text: str) -> int:
    return _capacity(text, 0)


def _priority(text: str) -> str:
    """A key's priority: high, normal or low."""
    key = text.strip().lower()
    if key not in PRIORITIES:
        raise argparse.ArgumentTypeError(f"expected high, normal or low, got {text!r}")
    return key


def _max_priority(text: str) -> str:
    """The highest priority a key's requests may ask for, or any (no cap)."""
    key = text.strip().lower()
    if key not in PRIORITIES and key != UNCAPPED:
        raise argparse.ArgumentTypeError(f"expected high, normal, low or any, got {text!r}")
    return key


def _share(text: str) -> int:
    """A key's weight in the fair share."""
    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_SHARE:
        raise argparse.ArgumentTypeError(f"expected a whole number 1-{MAX_SHARE}, got {text!r}")
    return int(text)


def _limit(text: str) -> int:
    """A per-key limit: a whole number, 0 meaning unlimited."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number (0: unlimited), got {text!r}")
    return int(text)


def build_parser(prog: str, group: str) -> argparse.ArgumentParser:
    # The common options are accepted before and after the command ("nodes list --json").
    common = _Parser(add_help=False)
    common.add_argument(
        "--redis-url",
        default=argparse.SUPPRESS,
        help="the fleet's Redis [env FLEETGATE_REDIS_URL]",
    )
    common.add_argument(
        "--prefix", default=argparse.SUPPRESS, help="key prefix [env FLEETGATE_PREFIX]"
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print JSON instead of a table",
    )
    parser = _Parser(prog=prog, description=__doc__.splitlines()[0], parents=[common])
    parser.set_defaults(
        redis_url=os.environ.get("FLEETGATE_REDIS_URL"),
        prefix=os.environ.get("FLEETGATE_PREFIX", "fleetgate"),
        json=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(name, help=help_text, parents=[common])
        return sub

    if group == "nodes":
        add = command("add", "register a node, or update a known one: only what is given changes")
        add.add_argument("url")
        add.add_argument(
            "--model",
            action="append",
            default=[],
            help="model it serves (repeatable); absent: ask its /v1/models",
        )
        add.add_argument("--role", type=_role, help="hybrid (new nodes' default), prefill, decode")
        add.add_argument("--speed", type=_positive)
        add.add_argument("--weight", type=_positive, help="new nodes' default: 1")
        add.add_argument("--api-key", help="key the gateways send to this node")
        add.add_argument("--insecure", action="store_true", help="https without certificate checks")
        add.add_argument("--cache-blocks", type=_cache_blocks, help=CACHE_BLOCKS_HELP)
        add.add_argument(
            "--max-inflight", type=_max_inflight, help=MAX_INFLIGHT_HELP + " (default: unlimited)"
        )
        remove = command("remove", "remove a node with its leases and history")
        remove.add_argument("url")
        drain = command("drain", "stop new requests; wait for in-flight ones")
        drain.add_argument("url")
        drain.add_argument("--no-wait", action="store_true")
        drain.add_argument("--timeout", type=_positive, default=600.0, help="seconds to wait")
        command("list", "every node with its state and load")
        change = command(
            "set", "change a node's weight, speed, key, cache blocks, capacity or state"
        )
        change.add_argument("url")
        change.add_argument("--weight", type=_positive)
        change.add_argument("--speed", type=_positive)
        change.add_argument("--api-key")
        change.add_argument("--clear-api-key", action="store_true")
        change.add_argument("--model", action="append")
        change.add_argument("--state", choices=["active", "draining"])
        change.add_argument("--cache-blocks", type=_cache_blocks, help=CACHE_BLOCKS_HELP)
        change.add_argument(
            "--max-inflight",
            type=_max_inflight_or_unlimited,
            help=MAX_INFLIGHT_HELP + " (0: unlimited)",
        )
    else:
        add = command("add", "create a client API key (printed once)")
        add.add_argument("name")
        add.add_argument("--key", help="the key to store (default: a new random one)")
        change = command("set", "change the limits or admission settings of the key with this name")
        change.add_argument("name")
        for sub in (add, change):  # per-key limits across all replicas; a new key has none
            sub.add_argument("--rpm", type=_limit, help="requests per minute (0: unlimited)")
            sub.add_argument(
                "--concurrency", type=_limit, help="requests in flight at once (0: unlimited)"
            )
            # Admission across the fleet (a new key: normal, uncapped, share 1).
            sub.add_argument(
                "--priority",
                type=_priority,
                help="high, normal or low: that of its requests that ask for none",
            )
            sub.add_argument(
                "--max-priority",
                type=_max_priority,
                help="high, normal or low: the highest its requests may ask for (any: no cap)",
            )
            sub.add_argument(
                "--share",
                type=_share,
                help=f"its weight in the fair share of a queue, 1-{MAX_SHARE} (default 1)",
            )
        revoke = command(
            "revoke", "revoke the key with this name (the API stays closed without keys)"
        )
        revoke.add_argument("name")
        command("list", "key names and fingerprints (never the keys)")
        command(
            "open",
            "let callers without a key use the OpenAI API again (refused while keys are stored)",
        )
        parser.epilog = KEYS_EPILOG
    return parser


# -- output -----------------------------------------------------------------------------


def table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def node_row(status: NodeStatus) -> dict[str, Any]:
    node = status.node
    latencies = status.latencies_s
    return {
        "url": node.url,
        "models": list(node.models),
        "role": node.role.name.lower(),
        "state": node.state.value,
        "in_flight": status.in_flight,
        "speed": node.speed,
        "weight": node.weight,
        "api_key": node.api_key is not None,
        "mean_latency_s": round(sum(latencies) / len(latencies), 4) if latencies else None,
        "cache_blocks": node.cache_blocks,
        "prefix_blocks": status.prefix_blocks,
        "max_inflight": node.max_inflight,  # None: unlimited
        "reason": node.state_reason,
    }


def print_nodes(rows: list[dict[str, Any]], as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(orjson.dumps(rows).decode() + "\n")
        return
    header = ["URL", "MODELS", "ROLE", "STATE", "IN-FLIGHT", "MAX-INFLIGHT", "SPEED", "WEIGHT"]
    lines = [[*header, "LATENCY", "WHY"]]
    for r in rows:
        latency = "-" if r["mean_latency_s"] is None else f"{r['mean_latency_s']:.3f}s"
        lines.append(
            [
                r["url"],
                ",".join(r["models"]),
                r["role"],
                r["state"],
                str(r["in_flight"]),
                str(r["max_inflight"] or "-"),
                "-" if r["speed"] is None else f"{r['speed']:g}",
                f"{r['weight']:g}",
                latency,
                r["reason"],
            ]
        )
    if len(lines) == 1:
        out.write("no nodes registered\n")
        return
    table(lines, out)


QUEUE_ORDER = ("high", "normal", "low")


def print_queues(waiting: dict[str, tuple[int, int, int]], out: TextIO) -> None:
    """One line per model whose queue holds requests waiting for a node with room."""
    for model, counts in sorted(waiting.items()):
        if sum(counts):
            split = ", ".join(f"{n} {p}" for p, n in zip(QUEUE_ORDER, counts, strict=True))
            out.write(f"queue {model}: {sum(counts)} waiting ({split})\n")


KEY_COLUMNS = "NAME FINGERPRINT CREATED RPM CONCURRENCY PRIORITY MAX-PRIORITY SHARE".split()


def key_row(key: ApiKey) -> dict[str, Any]:
    return {
        "name": key.name,
        "fingerprint": key.fingerprint,
        "created_ms": key.created_ms,
        "rpm": key.rpm,  # 0: unlimited
        "concurrency": key.concurrency,
        "priority": _priority_name(key.priority),
        "max_priority": None if key.max_priority is None else _priority_name(key.max_priority),
        "share": key.share,
    }


def _priority_name(priority: Priority) -> str:
    return priority.name.lower()


def _limits_text(key: ApiKey) -> str:
    cap = UNCAPPED if key.max_priority is None else _priority_name(key.max_priority)
    return (
        f"rpm {key.rpm or '-'}, concurrency {key.concurrency or '-'}, "
        f"priority {_priority_name(key.priority)}, max priority {cap}, share {key.share}"
    )


# -- commands ---------------------------------------------------------------------------


async def ask_models(url: str, api_key: str | None, insecure: bool = False) -> list[str]:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=5.0, verify=not insecure) as client:
            response = await client.get(f"{url}/v1/models", headers=headers)
        if response.status_code != 200:
            # llama.cpp's server answers 503 "Loading model" on every path until it is ready.
            raise InvalidInput(
                f"{url}/v1/models answered {response.status_code}"
                f"{_error_message(response)}; retry when it is ready, or pass --model"
            )
        models = model_ids(response.json())
    except httpx.ConnectError:
        # vLLM binds its port only once its model is loaded: refused is how it says loading.
        raise InvalidInput(
            f"nothing listens at {url} yet (an engine loading its model, as vLLM does, does not "
            "listen); retry when it is ready, or pass --model"
        ) from None
    except (httpx.HTTPError, ValueError) as exc:
        raise InvalidInput(f"could not ask {url} for its models ({exc}); pass --model") from None
    if not models:
        raise InvalidInput(f"{url}/v1/models lists no models; pass --model")
    return models


def _error_message(response: httpx.Response) -> str:
    """``: <message>`` of an OpenAI-shaped error answer, cut short; empty for anything else."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    message = error.get("message") if isinstance(error, dict) else None
    return f": {message[:200]}" if isinstance(message, str) and message else ""


async def run_nodes(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    command = args.command
    if command == "list":
        statuses = await store.status()
        rows = [node_row(s) for s in statuses]
        waiting = await fleet_queue.depths(store, [s.node for s in statuses])
        for row in rows:
            row["queue"] = {
                model: dict(zip(QUEUE_ORDER, waiting.get(model, (0, 0, 0)), strict=True))
                for model in row["models"]
            }
        print_nodes(rows, args.json, out)
        if not rows and not args.json:
            out.write(await describe_empty_registry(store) + "\n")
        if not args.json:
            print_queues(waiting, out)
        return 0
    url = normalize_url(args.url)
    if command == "add":
        created = await add_node(store, url, args)
        verb = "added" if created else "updated"
    elif command == "remove":
        await store.remove_node(url)
        verb = "removed"
    elif command == "set":
        if args.api_key is not None and args.clear_api_key:
            raise InvalidInput("--api-key and --clear-api-key contradict each other")
        api_key = "" if args.clear_api_key else args.api_key
        fields = (
            args.model,
            args.speed,
            args.weight,
            api_key,
            args.cache_blocks,
            args.max_inflight,
        )
        if not args.state or any(f is not None for f in fields):
            # A state change alone is one write (one registry re-read on every replica).
            await store.update_node(
                url,
                models=args.model,
                speed=args.speed,
                weight=args.weight,
                api_key=api_key,
                cache_blocks=args.cache_blocks,
                max_inflight=args.max_inflight,
            )
        if args.state:
            await store.set_state(url, NodeState(args.state), f"set {args.state} by operator")
        verb = "changed"
    elif command == "drain":
        await store.drain(url)
        if not args.no_wait and not await wait_drained(store, url, args.timeout, args.json):
            return EXIT_FAILED
        verb = "drained"
    else:  # pragma: no cover - argparse restricts the commands
        raise InvalidInput(f"unknown command {command}")
    if command == "remove":
        if args.json:
            out.write(orjson.dumps({"url": url, "result": verb}).decode() + "\n")
        else:
            out.write(f"{url}: {verb}\n")
        return 0
    rows = [node_row(s) for s in await store.status() if s.node.id == url]
    if args.json:
        out.write(orjson.dumps({"result": verb, "node": rows[0] if rows else None}).decode())
        out.write("\n")
    else:
        out.write(f"{url}: {verb}\n")
        print_nodes(rows, False, out)
    return 0


async def describe_empty_registry(store: Store) -> str:
    """What a store without nodes holds: a registry emptied on purpose, or none at all."""
    epoch = await store.epoch()
    keys = len(await store.list_keys())
    if epoch == 0 and keys == 0 and await read_restore_record(store) is None:
        return (
            "the store holds no registry at all (no epoch, no keys): it is new, or it lost its "
            "data (FLUSHALL, restarted empty, a fail-over to a replica that lagged); running "
            "gateway replicas write their last registry back within seconds"
        )
    return f"registry epoch {epoch}, {keys} client key(s)"


async def add_node(store: Store, url: str, args: argparse.Namespace) -> bool:
    """``nodes add``: register a new node, or change only the given fields of a known one
    (its state, a drain, and what was set before stay); returns whether it is new."""
    try:
        known: Node | None = await store.get_node(url)
    except UnknownNode:
        known = None
    api_key = args.api_key if args.api_key is not None else (known and known.api_key)
    insecure = args.insecure or bool(known and known.insecure)
    models = args.model or await ask_models(url, api_key or None, insecure)
    if known is not None:
        await store.update_node(
            url,
            models=models,
            role=args.role,
            speed=args.speed,
            weight=args.weight,
            api_key=args.api_key,
            insecure=True if args.insecure else None,
            cache_blocks=args.cache_blocks,
            max_inflight=args.max_inflight,
        )
        return False
    _, created = await store.add_node(
        url,
        models,
        role=Role.HYBRID if args.role is None else args.role,
        speed=args.speed,
        weight=1.0 if args.weight is None else args.weight,
        api_key=args.api_key,
        insecure=args.insecure,
        reason="added by fleetgate nodes add",
        cache_blocks=args.cache_blocks,
        max_inflight=args.max_inflight,
    )
    return created


async def wait_drained(store: Store, url: str, timeout_s: float, quiet: bool) -> bool:
    """Wait until the node has no request in flight, printing progress to stderr."""
    deadline = time.monotonic() + timeout_s
    last = -1
    while True:
        in_flight = await store.in_flight(url)
        if in_flight != last and not quiet:
            print(f"draining {url}: {in_flight} in flight", file=sys.stderr, flush=True)
            last = in_flight
        if in_flight == 0:
            return True
        if time.monotonic() >= deadline:
            print(f"{url} still has {in_flight} in flight after {timeout_s:g}s", file=sys.stderr)
            return False
        await asyncio.sleep(0.5)


async def run_keys(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "list":
        rows = [key_row(k) for k in await store.list_keys()]
        if args.json:
            out.write(orjson.dumps(rows).decode() + "\n")
        elif rows:
            table(
                [KEY_COLUMNS]
                + [
                    [
                        r["name"],
                        r["fingerprint"],
                        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_ms"] / 1000)),
                        str(r["rpm"] or "-"),
                        str(r["concurrency"] or "-"),
                        r["priority"],
                        r["max_priority"] or UNCAPPED,
                        str(r["share"]),
                    ]
                    for r in rows
                ],
                out,
            )
        else:
            out.write("no API keys stored\n")
        return 0
    if args.command == "revoke":
        await store.revoke_key(args.name)
        out.write(
            orjson.dumps({"name": args.name, "result": "revoked"}).decode() + "\n"
            if args.json
            else f"{args.name}: revoked\n"
        )
        return 0
    if args.command == "open":
        result = "opened" if await store.open_keys() else "already open"
        out.write(
            orjson.dumps({"result": result}).decode() + "\n"
            if args.json
            else f"OpenAI API {result}: callers without a key are accepted\n"
        )
        return 0
    if args.command == "set":
        if all(v is None for v in _key_settings(args).values()):
            raise InvalidInput(
                "give at least one of --rpm, --concurrency (0: unlimited), --priority, "
                "--max-priority, --share"
            )
        stored, changed = await store.set_key_limits(args.name, **_key_settings(args))
        result = "changed" if changed else "unchanged"
        if args.json:
            out.write(orjson.dumps({**key_row(stored), "result": result}).decode() + "\n")
        else:
            out.write(f"{stored.name}: {result} ({_limits_text(stored)})\n")
        return 0
    key = args.key or "fg-" + secrets.token_urlsafe(32)
    stored, created = await store.add_key(args.name, key, **_key_settings(args))
    if args.json:
        payload = {**key_row(stored), "result": "added" if created else "exists"}
        if created and not args.key:
            payload["key"] = key
        out.write(orjson.dumps(payload).decode() + "\n")
    elif created:
        out.write(
            f"{stored.name}: added (fingerprint {stored.fingerprint}, {_limits_text(stored)})\n"
        )
        if not args.key:
            out.write(f"key (shown once, store it now): {key}\n")
    else:
        out.write(
            f"{stored.name}: already stored (fingerprint {stored.fingerprint}, "
            f"{_limits_text(stored)})\n"
        )
    return 0


def _key_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The limits and admission settings given to ``keys add`` or ``keys set`` (None: not)."""
    names = ("rpm", "concurrency", "priority", "max_priority", "share")
    return {name: getattr(args, name) for name in names}


def redact_url(url: str) -> str:
    """``url`` with its passwords (the server's, ``sentinel_password``) masked, to print."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password:
        userinfo, _, hosts = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    query = re.sub(r"(^|&)(sentinel_password=)[^&]*", r"\1\2***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def main(group: str, argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run ``fleetgate <group> …``; returns the exit code."""
    out = out or sys.stdout
    prog = f"fleetgate {group}"
    tokens = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(prog, group).parse_args(tokens)
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # argparse lets the command's defaults hide a --json given before the command.
    args.json = args.json or "--json" in tokens
    if not args.redis_url:
        print(f"{prog}: --redis-url (or FLEETGATE_REDIS_URL) is required", file=sys.stderr)
        return EXIT_USAGE
    runner: Callable[[Store, argparse.Namespace, TextIO], Coroutine[Any, Any, int]]
    runner = run_nodes if group == "nodes" else run_keys

    async def run() -> int:
        store = Store.open(args.redis_url, prefix=args.prefix, timeout_s=3.0)
        try:
            return await runner(store, args, out)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StoreRefusingWrites as exc:
        where = redact_url(args.redis_url)
        print(f"{prog}: the store at {where} is unavailable: {exc}", file=sys.stderr)
        return EXIT_STORE
    except StoreUnavailable as exc:
        print(
            f"{prog}: cannot reach the store at {redact_url(args.redis_url)}: {exc}",
            file=sys.stderr,
        )
        return EXIT_STORE
    except (UnknownNode, UnknownKey) as exc:
        print(
            f"{prog}: {type(exc).__name__.replace('Unknown', 'unknown ').lower()}: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except (InvalidInput, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StateError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED
