"""The gateway benchmark's ceiling: a trivial hypercorn + Starlette app that answers every chat
completion at once with a fixed small JSON, on the gateway's own server stack."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from scripts.bench.load import CHAT_PATH, MODEL

TRIVIAL_ANSWER = json.dumps(
    {
        "id": "chatcmpl-trivial",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "logprobs": None,
                "finish_reason": "length",
                "message": {
                    "role": "assistant",
                    "content": "".join(f"tok{i} " for i in range(16)),
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21},
    }
).encode()


async def _trivial_chat(request: Request) -> Response:
    await request.body()
    return Response(TRIVIAL_ANSWER, media_type="application/json")


trivial_app = Starlette(routes=[Route(CHAT_PATH, _trivial_chat, methods=["POST"])])


def serve_trivial(port: int) -> int:
    """Serve :data:`trivial_app` with hypercorn on 127.0.0.1:``port`` until SIGINT/SIGTERM."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75.0  # as the gateway's

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"trivial app listening on http://127.0.0.1:{port}", flush=True)
        await serve(trivial_app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    from gateway.replica.server import loop_factory

    # The same event loop as the gateway's, so the ceiling is that of the same server stack.
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory()) as r:
        r.run(main())
    return 0
