"""``fleetgate serve``: hypercorn serving the gateway, one process or ``--workers N``.

Stopping (SIGTERM, SIGINT) refuses new connections at once, gives requests in flight the
grace period (``--shutdown-timeout``), then cuts the rest (see :mod:`.shutdown`). With
``--workers N`` a master process holds the listening sockets and N spawned workers serve them;
each worker stops the same way when the master tells it to, and also when the master is gone
(SIGKILL, the OOM killer): a worker never serves on unsupervised. The master also makes the
workers' metrics folder, through which a scrape of any worker shows the replica's sum (see
:mod:`.worker_metrics`), and removes it when they are all gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import h11
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.utils import wrap_app

from gateway.common import tracing
from gateway.common.config import (
    ConfigError,
    argv_for_workers,
    argv_from_environment,
    setup_logging,
)

from .app import create_app
from .errors import error_body
from .settings import GatewaySettings, load_settings
from .shutdown import CUT_SETTLE_S

log = logging.getLogger("fleetgate.gateway")

MASTER_POLL_S = 0.2
"""How often a worker looks at its master's stop event, and for the master itself (Linux
also signals it at once, see :func:`_die_with_parent`)."""

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


_UNPARSABLE = {
    400: ("malformed HTTP request: it could not be parsed", "invalid_request"),
    431: ("request header fields too large", "request_header_fields_too_large"),
}


async def _send_protocol_error(self: H11Protocol, status_code: int) -> None:
    """hypercorn's answer to a request it cannot parse (a bad request line, header or length,
    a target that is not ASCII), with an OpenAI-shaped body instead of an empty one; the
    connection is closed after it, as hypercorn does."""
    message, code = _UNPARSABLE.get(status_code, _UNPARSABLE[400])
    body = error_body(message, "invalid_request_error", code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *self.config.response_headers("h11"),
    ]
    await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


# Replaces a private method: tests/e2e/test_request_input.py sends unparsable requests and
# fails if a hypercorn release stops calling it.
H11Protocol._send_error_response = _send_protocol_error  # type: ignore[method-assign]


def hypercorn_config(settings: GatewaySettings) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = None  # hypercorn.error propagates to the root logging set up here
    config.keep_alive_timeout = 75.0
    # The gateway cuts what is left after the grace period itself (an SSE error event, the
    # lease released): hypercorn waits for that instead of dropping connections first.
    config.graceful_timeout = settings.shutdown_timeout + CUT_SETTLE_S + 1.0
    config.loglevel = settings.log_level.upper()
    if settings.ssl:
        config.certfile = settings.certfile
        config.keyfile = settings.keyfile
    return config


async def serve_async(
    settings: GatewaySettings,
    sockets: Sockets | None = None,
    master: tuple[int, EventType] | None = None,
    metrics_folder: Path | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (or, for a worker, until its ``master`` — pid and stop
    event — says so or is gone), then drain within the grace period. A worker exchanges its
    metrics with the others through ``metrics_folder``."""
    app = create_app(settings, metrics_folder=metrics_folder)
    config = hypercorn_config(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = None
    if master is not None:
        watcher = loop.create_task(_watch_master(*master, stop))

    async def shutdown_trigger() -> None:
        await stop.wait()
        app.gateway.drain.begin(settings.shutdown_timeout)

    if master is None:
        store = "embedded" if settings.embedded else "redis"
        scheme = "https" if settings.ssl else "http"
        print(
            f"fleetgate: gateway {app.gateway.replica} on {scheme}://{settings.host}:"
            f"{settings.port} (strategy {settings.strategy.value}, store {store})",
            flush=True,
        )
    if settings.disable_cache_status:
        log.info("--disable-cache-status has no effect: node state lives in the store, not a file")
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    tracing.setup("fleetgate-gateway", app.gateway.replica)  # when OTEL_* variables ask
    try:
        await worker_serve(wrapped, config, sockets=sockets, shutdown_trigger=shutdown_trigger)
    finally:
        if watcher is not None:
            watcher.cancel()
        tracing.shutdown()


async def _watch_master(master_pid: int, told: EventType, stop: asyncio.Event) -> None:
    """Set ``stop`` when the master asks every worker to stop, or when it is gone."""
    while not stop.is_set():
        if told.is_set():
            stop.set()
        elif os.getppid() != master_pid:
            log.warning("the master process %d is gone: this worker stops", master_pid)
            stop.set()
        else:
            await asyncio.sleep(MASTER_POLL_S)


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies (a graceful stop, not a lost lease);
    elsewhere :func:`_watch_master` polls for it."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run_worker(sockets: Sockets, told: EventType, master_pid: int, metrics_folder: str) -> None:
    """One ``--workers`` process (spawned by :func:`run_master`): serves the master's sockets
    with the command line handed down in the environment."""
    _die_with_parent()
    if os.getppid() != master_pid:
        return  # the master died before the kernel could be told to signal this worker
    settings = load_settings(argv_from_environment())
    setup_logging(settings.log_level)
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=loop_factory()) as runner,
    ):
        runner.run(serve_async(settings, sockets, (master_pid, told), Path(metrics_folder)))


def run_master(settings: GatewaySettings, args: Sequence[str]) -> int:
    """Hold the sockets, run ``--workers`` worker processes, stop them on SIGTERM or SIGINT;
    when one worker fails, stop all. Returns the exit status."""
    os.environ.update(argv_for_workers(args))
    config = hypercorn_config(settings)
    config.workers = settings.workers
    sockets = config.create_sockets()
    context = multiprocessing.get_context("spawn")
    told = context.Event()
    metrics_folder = tempfile.mkdtemp(prefix="fleetgate-metrics-")

    def stop(*_: object) -> None:
        told.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    workers = [
        context.Process(target=run_worker, args=(sockets, told, os.getpid(), metrics_folder))
        for _ in range(settings.workers)
    ]
    for worker in workers:
        worker.start()
    print(
        f"fleetgate: {settings.workers} gateway workers on {settings.host}:{settings.port}",
        flush=True,
    )
    status = 0
    running = list(workers)
    while running:
        for sentinel in wait([w.sentinel for w in running]):
            worker = next(w for w in running if w.sentinel == sentinel)
            worker.join()
            running.remove(worker)
            if worker.exitcode and not told.is_set():
                log.error("worker %d exited with %s: stopping all", worker.pid, worker.exitcode)
                status = status or 1
            told.set()  # one worker gone: the replica stops as a whole
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.close()
    shutil.rmtree(metrics_folder, ignore_errors=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        print(f"fleetgate serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    if settings.workers > 1:
        return run_master(settings, args)
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
