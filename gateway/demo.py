"""``fleetgate demo``: a whole fleet in one process for a first look, with no Redis and no GPU.

Starts the embedded store, three simulated nodes of different speeds, a gateway in front of
them and a health-checker, prints commands to try, and stops cleanly on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import signal
import sys
from collections.abc import Sequence

from aiohttp import web
from hypercorn.asyncio import serve as hypercorn_serve

from gateway.checker.health_checker import CheckerSettings, HealthChecker
from gateway.common.config import setup_logging
from gateway.replica.app import create_app
from gateway.replica.server import hypercorn_config
from gateway.replica.settings import GatewaySettings
from gateway.sim.node import SimConfig, build_app
from shared_state import Store, StoreSettings, Strategy

MODEL = "demo-model"
# (tokens per second per sequence, batch slots): one fast node, one medium, one slow.
NODE_SHAPES = ((120.0, 8), (60.0, 8), (30.0, 4))


def instructions(base: str) -> str:
    body = (
        '{"model": "' + MODEL + '", "messages": [{"role": "user", "content": "Hello"}], '
        '"max_tokens": 16}'
    )
    return f"""
Try it:
  curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'
  curl {base}/nodes/status
  python -c "from openai import OpenAI; c = OpenAI(base_url='{base}/v1', api_key='none'); \
print(c.chat.completions.create(model='{MODEL}', \
messages=[{{'role': 'user', 'content': 'Hi'}}]).choices[0].message.content)"
Ctrl-C stops everything."""


async def run_demo(host: str, port: int, strategy: Strategy) -> None:
    runners: list[web.AppRunner] = []
    store = Store.open(None, settings=StoreSettings())
    try:
        urls = []
        for tokens_per_s, slots in NODE_SHAPES:
            runner = web.AppRunner(
                build_app(
                    SimConfig(
                        host="127.0.0.1",
                        port=0,
                        models=(MODEL,),
                        slots=slots,
                        tokens_per_s=tokens_per_s,
                        prefill_ms=20.0,
                    )
                ),
                access_log=None,
            )
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            # Speed in the registry is what min_expected_latency weighs in-flight requests by.
            await store.add_node(url, [MODEL], speed=tokens_per_s * slots, reason="demo node")
            urls.append((url, tokens_per_s, slots))
        settings = GatewaySettings(host=host, port=port, strategy=strategy, log_level="warning")
        app = create_app(settings, store)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        base = f"http://{host}:{port}"
        print(
            f"fleetgate demo: gateway {base} (strategy {strategy.value}, embedded store, "
            "health-checker every 2 s)"
        )
        for url, tokens_per_s, slots in urls:
            print(f"  simulated node {url}: {slots} slots x {tokens_per_s:g} tokens/s")
        print(instructions(base), flush=True)
        checker = HealthChecker(
            CheckerSettings(interval=2.0, timeout=1.0, deregister_after=0.0, checker_id="demo"),
            store,
        )
        checking = loop.create_task(checker.run(stop))
        try:
            await hypercorn_serve(app, hypercorn_config(settings), shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        finally:
            stop.set()
            await checking
    finally:
        for runner in runners:
            await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetgate demo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--strategy",
        type=Strategy,
        default=Strategy.MIN_EXPECTED_LATENCY,
        choices=list(Strategy),
        metavar="STRATEGY",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    setup_logging("warning")
    try:
        asyncio.run(run_demo(args.host, args.port, args.strategy))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"fleetgate demo: port {args.port} is in use; try --port", file=sys.stderr)
            return 1
        raise
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
