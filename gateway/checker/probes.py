"""The health-checker's probes of one node, each bounded by its timeout, and the parsing of
the load figures model servers publish on ``/metrics``.

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

# Gauge names by server: vLLM (current and older), SGLang, LMDeploy.
KV_USAGE = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "lmdeploy:gpu_cache_usage_perc",
    "lmdeploy:kv_cache_usage_perc",
)
# What one probe may raise besides a verdict: transport errors, and a URL or a header httpx
# refuses to send (a node hash written by a script is not validated: a full-width host name
# raises InvalidURL, a non-ASCII key a UnicodeEncodeError). Each is that node's failure.
PROBE_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, httpx.InvalidURL, ValueError)

RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs", "lmdeploy:num_requests_running")
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "lmdeploy:num_requests_waiting")


@dataclass(frozen=True, slots=True)
class Finding:
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Load:
    kv_usage: float
    running: int
    waiting: int


def parse_load(text: str) -> Load | None:
    """KV-cache use (max over label sets), running and waiting (sums) from Prometheus text."""
    usage: float | None = None
    running = waiting = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        name = line[:name_end]
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
    if usage is None:
        return None
    return Load(min(max(usage, 0.0), 1.0), int(running), int(waiting))


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
        return parse_load(response.text)
