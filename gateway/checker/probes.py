"""The health-checker's probes of one node, each bounded by its timeout, and the parsing of
the load figures model servers publish on ``/metrics``.

A node's load is its KV-cache use, with its running and waiting requests; it is recorded only
with a KV figure, which ``min_cache_usage`` routes by. vLLM, SGLang and LMDeploy publish all
three as gauges. llama.cpp's ``llama-server`` (with ``--metrics``) publishes its running
(``llamacpp:requests_processing``) and deferred requests but, since it dropped
``llamacpp:kv_cache_usage_ratio``, no KV gauge: its figure is then read from ``/slots`` (on
by default), as the tokens held by its busy slots over all slots' context.

httpx is the client here: probes are few and small, and its timeout values fit the checker.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable
from dataclasses import dataclass

import httpx
import orjson

from shared_state import Node
from shared_state.registry import model_ids

# Gauge names by server: vLLM (current and older), SGLang, LMDeploy, llama.cpp (older).
KV_USAGE = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "lmdeploy:gpu_cache_usage_perc",
    "lmdeploy:kv_cache_usage_perc",
    "llamacpp:kv_cache_usage_ratio",
)
LLAMACPP_PREFIX = "llamacpp:"
# What one probe may raise besides a verdict: transport errors, and a URL or a header httpx
# refuses to send (a node hash written by a script is not validated: a full-width host name
# raises InvalidURL, a non-ASCII key a UnicodeEncodeError). Each is that node's failure.
PROBE_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, httpx.InvalidURL, ValueError)

RUNNING = (
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "lmdeploy:num_requests_running",
    "llamacpp:requests_processing",
)
WAITING = (
    "vllm:num_requests_waiting",
    "sglang:num_queue_reqs",
    "lmdeploy:num_requests_waiting",
    "llamacpp:requests_deferred",
)


@dataclass(frozen=True, slots=True)
class Finding:
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Load:
    kv_usage: float
    running: int
    waiting: int


@dataclass(frozen=True, slots=True)
class Gauges:
    """What a metrics page told: KV-cache use if it has a gauge of it, running and waiting
    requests, and whether the page is llama.cpp's (whose KV figure is on ``/slots``)."""

    kv_usage: float | None
    running: int
    waiting: int
    llamacpp: bool

    def load(self, kv_usage: float | None = None) -> Load | None:
        """The load, with ``kv_usage`` from elsewhere when the page had none."""
        usage = self.kv_usage if self.kv_usage is not None else kv_usage
        if usage is None:
            return None
        return Load(min(max(usage, 0.0), 1.0), self.running, self.waiting)


def parse_load(text: str) -> Load | None:
    """KV-cache use (max over label sets), running and waiting (sums) from Prometheus text;
    None without a KV figure."""
    return parse_gauges(text).load()


def parse_gauges(text: str) -> Gauges:
    """The gauges of :func:`parse_load`, the KV figure None when the page has none."""
    usage: float | None = None
    running = waiting = 0.0
    llamacpp = False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        name = line[:name_end]
        llamacpp = llamacpp or name.startswith(LLAMACPP_PREFIX)
        try:
            value = float(line.rsplit(" ", 1)[-1])
        except ValueError:
            continue
        if not math.isfinite(value):
            continue
        if name in KV_USAGE:
            value = value / 100 if value > 1.0 else value  # some servers publish percent
            usage = value if usage is None else max(usage, value)
        elif name in RUNNING:
            running += value
        elif name in WAITING:
            waiting += value
    return Gauges(usage, int(running), int(waiting), llamacpp)


def slots_usage(listing: object) -> float | None:
    """KV-cache use from llama.cpp's ``/slots``: the tokens held by busy slots (prompt and
    generated so far, ``n_prompt_tokens``) over the context of all slots; None if the answer
    is not a list of slots.

    An idle slot's tokens stay in its cache for the next prompt that shares their prefix, but
    are not counted: like vLLM's freed blocks, they are given up as soon as room is needed.
    A server started with ``--kv-unified`` (its default only when the slot count is automatic)
    reports the whole shared pool as every slot's ``n_ctx``: its figure is then the slot count
    times too small, but still orders its own moments rightly.
    """
    if not isinstance(listing, list) or not listing:
        return None
    held = capacity = 0
    for slot in listing:
        if not isinstance(slot, dict):
            return None
        n_ctx = slot.get("n_ctx")
        if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx <= 0:
            return None
        capacity += n_ctx
        tokens = slot.get("n_prompt_tokens")
        if slot.get("is_processing") is True and isinstance(tokens, int) and tokens > 0:
            held += tokens
    return held / capacity


class Prober:
    def __init__(self, timeout_s: float) -> None:
        def client(verify: bool) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                timeout=httpx.Timeout(timeout_s),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                follow_redirects=False,
                verify=verify,
            )

        self.client = client(True)
        self._insecure = client(False)  # for nodes registered as insecure, as the gateway does

    def client_for(self, node: Node) -> httpx.AsyncClient:
        return self._insecure if node.insecure else self.client

    async def close(self) -> None:
        await self.client.aclose()
        await self._insecure.aclose()

    @staticmethod
    def headers_of(node: Node) -> dict[str, str]:
        return {"authorization": f"Bearer {node.api_key}"} if node.api_key else {}

    async def _get(self, node: Node, path: str) -> httpx.Response:
        return await self.client_for(node).get(node.url + path, headers=self.headers_of(node))

    @staticmethod
    async def _finding(label: str, call: Awaitable[httpx.Response]) -> Finding:
        """A probe's verdict: a 200 in time passes; a timeout, an error or another status fails."""
        try:
            response = await call
        except httpx.TimeoutException:
            return Finding(False, f"{label} timed out")
        except PROBE_ERRORS as exc:
            return Finding(False, f"{label} failed: {type(exc).__name__}")
        if response.status_code != 200:
            return Finding(False, f"{label} answered {response.status_code}")
        return Finding(True, f"{label} 200")

    async def health(self, node: Node) -> Finding:
        return await self._finding("GET /health", self._get(node, "/health"))

    async def models(self, node: Node) -> list[str] | None:
        try:
            response = await self._get(node, "/v1/models")
            if response.status_code != 200:
                return None
            listing = orjson.loads(response.content)
        except PROBE_ERRORS:  # orjson.JSONDecodeError is a ValueError
            return None
        return model_ids(listing) or None

    async def generate(self, node: Node) -> Finding:
        """A one-token completion: catches a node whose /health is green but cannot generate."""
        if not node.models:
            return Finding(False, "no model to probe")
        body = {"model": node.models[0], "prompt": "ping", "max_tokens": 1, "stream": False}
        call = self.client_for(node).post(
            node.url + "/v1/completions", json=body, headers=self.headers_of(node)
        )
        return await self._finding("generation probe", call)

    async def load(self, node: Node) -> Load | None:
        try:
            response = await self._get(node, "/metrics")
        except PROBE_ERRORS:
            return None
        if response.status_code != 200:
            return None
        gauges = parse_gauges(response.text)
        if gauges.kv_usage is None and gauges.llamacpp:
            return gauges.load(await self._slots_usage(node))
        return gauges.load()

    async def _slots_usage(self, node: Node) -> float | None:
        """llama.cpp's KV figure from its ``/slots`` (None when it is off: ``--no-slots``)."""
        try:
            response = await self._get(node, "/slots")
            if response.status_code != 200:
                return None
            return slots_usage(orjson.loads(response.content))
        except PROBE_ERRORS:  # orjson.JSONDecodeError is a ValueError
            return None
