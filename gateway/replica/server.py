"""``fleetgate serve``: hypercorn serving the gateway, one process or ``--workers N``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from gateway.common.config import ConfigError, argv_for_workers, setup_logging

from .app import create_app
from .settings import GatewaySettings, load_settings


def hypercorn_config(settings: GatewaySettings) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = None  # hypercorn.error propagates to the root logging set up here
    config.keep_alive_timeout = 75.0
    config.graceful_timeout = settings.shutdown_timeout
    config.loglevel = settings.log_level.upper()
    if settings.ssl:
        config.certfile = settings.certfile
        config.keyfile = settings.keyfile
    return config


async def serve_async(settings: GatewaySettings) -> None:
    app = create_app(settings)
    config = hypercorn_config(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    store = "embedded" if settings.embedded else "redis"
    scheme = "https" if settings.ssl else "http"
    print(
        f"fleetgate: gateway {app.gateway.replica} on {scheme}://{settings.host}:{settings.port} "
        f"(strategy {settings.strategy.value}, store {store})",
        flush=True,
    )
    if settings.disable_cache_status:
        logging.getLogger("fleetgate.gateway").info(
            "--disable-cache-status has no effect: node state lives in the store, not a file"
        )
    await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        print(f"fleetgate serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    if settings.workers > 1:
        from hypercorn.run import run

        os.environ.update(argv_for_workers(args))
        config = hypercorn_config(settings)
        config.workers = settings.workers
        config.application_path = "gateway.replica.asgi:app"
        if loop_factory() is not None:
            config.worker_class = "uvloop"
        return run(config)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve_async(settings))
    except KeyboardInterrupt:
        pass
    return 0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (it is a dependency on POSIX), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
