"""The operators' status page, ``GET /ui``, and the JSON reads it polls besides
``/nodes/status`` and ``/nodes/replicas``: ``/nodes/events``, ``/nodes/receipts`` and
``/nodes/checker``.

The page is one HTML file with its CSS and JS inline (``ui/index.html``, shipped in the
wheel), so it works with no internet; its Content-Security-Policy lets only that inline
script and style run (by their hashes) and lets it fetch only from this replica. The page
itself is open to anyone; its data is not: the JSON reads take the admin rule of ``/nodes/*``
(loopback when no admin key is set, else the admin key), which the page asks for once.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import orjson
from starlette.requests import Request
from starlette.responses import Response

from shared_state import Store
from shared_state.health import EVENTS_KEPT, checker_leader, recent_events

from .auth import Authenticator
from .errors import BadRequest
from .receipts import Receipts

PAGE_RESOURCE = "ui/index.html"
EVENTS_SHOWN = 50  # /nodes/events without ?limit
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class PageFile:
    """The page's bytes and the policy that lets exactly its inline script and style run."""

    body: bytes
    csp: str

    @classmethod
    def parse(cls, html: str) -> PageFile:
        hashes: dict[str, list[str]] = {"script": [], "style": []}
        for tag, content in _INLINE.findall(html):
            digest = base64.b64encode(hashlib.sha256(content.encode()).digest()).decode()
            hashes[tag].append(f"'sha256-{digest}'")
        allowed = {tag: " ".join(found) or "'none'" for tag, found in hashes.items()}
        csp = "; ".join(
            [
                "default-src 'none'",
                f"script-src {allowed['script']}",
                f"style-src {allowed['style']}",
                "connect-src 'self'",
                "img-src data:",
                "base-uri 'none'",
                "form-action 'none'",
                "frame-ancestors 'none'",
            ]
        )
        return cls(html.encode(), csp)

    @classmethod
    def load(cls) -> PageFile:
        """The page shipped with the package."""
        folder = importlib.resources.files("gateway.replica")
        text = folder.joinpath(PAGE_RESOURCE).read_text("utf-8")
        return cls.parse(text)


class StatusPage:
    """``/ui`` and the reads only the page needs."""

    def __init__(
        self,
        store: Store,
        auth: Authenticator,
        receipts: Receipts,
        replica: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.auth = auth
        self.receipts = receipts
        self.replica = replica
        self.clock = clock
        self._page: PageFile | None = None

    def _now_ms(self) -> int:
        """This replica's clock, which the page sets its own by to show ages."""
        return int(self.clock() * 1000)

    def _check(self, request: Request) -> None:
        self.auth.check_admin(request.headers.raw, request.client.host if request.client else None)

    async def page(self, request: Request) -> Response:
        if self._page is None:
            self._page = PageFile.load()
        return Response(
            self._page.body,
            media_type="text/html; charset=utf-8",
            headers={
                "content-security-policy": self._page.csp,
                "cache-control": "no-cache",
                "x-content-type-options": "nosniff",
                "x-frame-options": "DENY",
                "referrer-policy": "no-referrer",
            },
        )

    async def events(self, request: Request) -> Response:
        """The latest node state transitions (the checker's event list), newest first."""
        self._check(request)
        limit = _limit(request, EVENTS_SHOWN, EVENTS_KEPT)
        events = await recent_events(self.store, limit)
        return _json({"events": msgspec.to_builtins(events), "now_ms": self._now_ms()})

    async def receipts_json(self, request: Request) -> Response:
        """This replica's latest requests with their route receipts, newest first."""
        self._check(request)
        limit = _limit(request, self.receipts.capacity, self.receipts.capacity)
        return _json(
            {
                "replica": self.replica,
                "kept": self.receipts.capacity,
                "receipts": self.receipts.latest(limit),
                "now_ms": self._now_ms(),
            }
        )

    async def checker(self, request: Request) -> Response:
        """Which health-checker leads now (its id only; the fencing token stays inside)."""
        self._check(request)
        leader = await checker_leader(self.store)
        return _json({"leader": leader, "now_ms": self._now_ms()})


def _json(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


def _limit(request: Request, default: int, most: int) -> int:
    """``?limit=N``: 1 to ``most``, ``default`` when absent."""
    text = request.query_params.get("limit")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= most:
        raise BadRequest(f"limit must be a whole number from 1 to {most}", param="limit")
    return int(text)
