"""A TCP relay in front of a node that keeps the bytes its clients sent: what the gateway's
upstream client wrote to the node, request heads included, read back by a test (the trace
context it passed on, say) while the node behind it answers as usual."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading

_TRACEPARENT = re.compile(rb"\r\ntraceparent: ([^\r]*)\r\n", re.IGNORECASE)


class Tap:
    """Listens on a free loopback port and relays every connection to ``port`` on loopback,
    both ways, keeping what each client sent; :attr:`url` is where clients connect."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._sent: list[bytearray] = []  # one per connection
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", 0)
        )
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _relay(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sent = bytearray()
        with self._lock:
            self._sent.append(sent)
        to_node: asyncio.StreamWriter | None = None
        try:
            node, to_node = await asyncio.open_connection("127.0.0.1", self._target)
            await asyncio.gather(
                self._pump(client, to_node, sent), self._pump(node, to_client, None)
            )
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for writer in (to_client, to_node):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await writer.wait_closed()
            self._tasks.discard(task)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bytearray | None
    ) -> None:
        while data := await src.read(65536):
            if keep is not None:
                with self._lock:
                    keep += data
            dst.write(data)
            await dst.drain()
        dst.close()

    def traceparents(self) -> list[str]:
        """Every ``traceparent`` request header relayed so far, connection by connection."""
        with self._lock:
            sent = [bytes(connection) for connection in self._sent]
        return [v.decode("latin-1") for data in sent for v in _TRACEPARENT.findall(data)]

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            relays = list(self._tasks)
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
