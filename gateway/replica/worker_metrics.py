"""A replica's metrics summed over its ``--workers``: whichever worker a scrape reaches asks
every other one for its figures now and sums them (:func:`gateway.common.metrics.merge`), so a
scrape shows the replica's totals and a counter only grows, whichever worker answers.

The master gives its workers a folder of their own (mode 0700). Each worker listens there on a
Unix socket, ``<pid>.sock``, that answers whoever connects with its snapshot (msgpack), and
writes every snapshot it gives, to a peer or to its own scrape, to ``<pid>.snap`` first. A
worker that does not answer within ``PEER_TIMEOUT_S`` (its loop stuck, or stopped) counts with
that file: never less than what any earlier scrape saw of it, so a sum is at worst stale, never
lower (``fleetgate_workers{figures="last_known"}`` counts such workers).

A request costs nothing here: snapshots are taken only when a scrape asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import msgspec

from gateway.common.metrics import Family, Merge, Series, merge, render_families

from .metrics import GatewayMetrics

log = logging.getLogger("fleetgate.gateway")

PEER_TIMEOUT_S = 1.0
"""How long a scrape waits for another worker's figures before it takes its last ones."""

encode_snapshot = msgspec.msgpack.Encoder().encode
decode_snapshot = msgspec.msgpack.Decoder(list[Family]).decode


class WorkerMetrics:
    """This worker's side of the exchange: answers its peers, and renders the replica's sum.
    Without a folder (one process), a scrape renders this process's figures alone."""

    def __init__(
        self, metrics: GatewayMetrics, folder: Path | None, pid: int | None = None
    ) -> None:
        self.metrics = metrics
        self.folder = folder
        self.pid = os.getpid() if pid is None else pid
        self._server: asyncio.Server | None = None

    def _path(self, pid: int, suffix: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{pid}.{suffix}"

    async def start(self) -> None:
        """Publish a first snapshot and answer peers (with a folder)."""
        if self.folder is None:
            return
        self._publish(self.metrics.snapshot())
        path = self._path(self.pid, "sock")
        path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._answer, path=str(path))

    async def stop(self) -> None:
        """Stop answering; the last snapshot file stays for the workers still serving."""
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._path(self.pid, "sock").unlink(missing_ok=True)
        self._server = None

    async def render(self) -> bytes:
        """The Prometheus page of the whole replica: this worker's figures and every peer's."""
        own = self.metrics.snapshot()
        if self.folder is None:
            return render_families([*own, _workers_family(1, 0)])
        self._publish(own)
        asked = await asyncio.gather(*(self._ask(pid) for pid in self._peers()))
        live = [snapshot for snapshot, fresh in asked if fresh and snapshot is not None]
        stale = [snapshot for snapshot, fresh in asked if not fresh and snapshot is not None]
        merged = merge([own, *live, *stale])
        return render_families([*merged, _workers_family(1 + len(live), len(stale))])

    def _peers(self) -> list[int]:
        assert self.folder is not None
        pids = {int(p.stem) for p in self.folder.iterdir() if p.stem.isdigit()}
        pids.discard(self.pid)
        return sorted(pids)

    def _publish(self, snapshot: list[Family]) -> bytes:
        """Write ``snapshot`` as this worker's last figures (atomically), and return it."""
        data = encode_snapshot(snapshot)
        final = self._path(self.pid, "snap")
        partial = self._path(self.pid, "part")
        partial.write_bytes(data)
        os.replace(partial, final)
        return data

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self._publish(self.metrics.snapshot()))
            await writer.drain()
        except OSError as exc:  # the asking worker gave up, or the folder went away
            log.debug("metrics for a peer not sent: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _ask(self, pid: int) -> tuple[list[Family] | None, bool]:
        """A peer's snapshot and whether it is live (else its last file, or None)."""
        try:
            async with asyncio.timeout(PEER_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(str(self._path(pid, "sock")))
                try:
                    data = await reader.read()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            return decode_snapshot(data), True
        except (OSError, TimeoutError, msgspec.DecodeError) as exc:
            log.debug("worker %d did not answer for metrics: %s", pid, exc)
        try:
            return decode_snapshot(self._path(pid, "snap").read_bytes()), False
        except (OSError, msgspec.DecodeError):
            return None, False


def _workers_family(live: int, last_known: int) -> Family:
    series = (
        Series((("figures", "live"),), live),
        Series((("figures", "last_known"),), last_known),
    )
    return Family(
        "fleetgate_workers",
        "Worker processes whose figures this scrape summed: live (answered now) or last_known "
        "(did not answer in time: their last figures).",
        "gauge",
        Merge.LOCAL,
        series,
    )
