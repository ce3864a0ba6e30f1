"""The fault switches of the simulated node (``--fault``, ``POST /sim/fault``): the modes, the
errors some answer with at once, and how a connection is cut, as a crashed peer or a broken
stream looks to the gateway."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Final

from aiohttp import web

FAULT_MODES: Final = frozenset(
    {"none", "fail", "status_502", "status_503", "status_504", "status_429", "hang", "slow"}
    | {"reset", "die_mid_stream", "unhealthy", "cannot_generate"}
)
# Faults that answer with an error status at once: (status, error type, error code).
STATUS_FAULTS: Final = {
    "fail": (500, "server_error", "internal_error"),
    "cannot_generate": (500, "server_error", "cannot_generate"),
    "status_502": (502, "server_error", "bad_gateway"),
    "status_503": (503, "server_error", "overloaded"),
    "status_504": (504, "server_error", "gateway_timeout"),
    "status_429": (429, "rate_limit_error", "rate_limit_exceeded"),
}


@dataclass(slots=True)
class Fault:
    mode: str = "none"
    remaining: int | None = None  # None: until changed
    delay_s: float = 1.0  # slow: extra seconds before the first byte
    factor: float = 10.0  # slow: multiplier of prefill and per-token time
    after_tokens: int = 3  # die_mid_stream: tokens sent before the cut


class ClientGone(Exception):
    """The peer disconnected (or the server is shutting down): stop working on the request."""


def abort(request: web.Request, rst: bool) -> None:
    """Close the request's connection now: with a TCP RST when ``rst``, else a plain close."""
    transport = request.transport
    if transport is None:
        return
    if rst:  # linger 0 turns close() into a TCP RST, the way a crashed peer looks
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
