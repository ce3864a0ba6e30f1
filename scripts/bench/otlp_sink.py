"""The gateway benchmark's span receiver: an OTLP/HTTP endpoint that accepts every trace export
(``POST /v1/traces``) and only counts it, so that a traced gateway runs OpenTelemetry's whole
pipeline (spans, the batch processor, protobuf encoding, the HTTP export) against a receiver
that costs next to nothing. ``GET /stats`` tells the exports and bytes received."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import urllib.request

from aiohttp import web

TRACES_PATH = "/v1/traces"


def serve_otlp_sink(port: int) -> int:
    """Serve the sink on 127.0.0.1:``port`` until SIGINT or SIGTERM."""
    received = {"exports": 0, "bytes": 0}

    async def export(request: web.Request) -> web.Response:
        body = await request.read()
        received["exports"] += 1
        received["bytes"] += len(body)
        # An empty ExportTraceServiceResponse: everything accepted.
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(received)

    async def main() -> None:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post(TRACES_PATH, export)
        app.router.add_get("/stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"OTLP sink listening on http://127.0.0.1:{port}", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def sink_stats(base: str) -> dict[str, int]:
    """What the sink at ``base`` received so far: exports and bytes."""
    with urllib.request.urlopen(base + "/stats", timeout=5) as response:
        data: dict[str, int] = json.loads(response.read())
    return data
