"""Connecting (prefill, decode) engine pairs once for the whole fleet, under a lock in the store
(LMDeploy's ``/distserve/p2p_initialize`` and ``/distserve/p2p_connect`` on both sides)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.common.pd_cleanup import Call, ControlBody, DistServeMetrics
from shared_state import Node, NodeState, Role, StateError, StoreUnavailable
from shared_state.pd import PDState

log = logging.getLogger("fleetgate.distserve")

CONNECT_ATTEMPTS = 3
LOCK_MS = 60_000  # a connect that takes longer than this lets another process try


class PairError(Exception):
    """A prefill/decode pair could not be connected."""


class PairMismatch(PairError):
    """The pair's engines cannot be connected at all (their parallel sizes differ)."""


def _json(body: bytes) -> Any:
    value = orjson.loads(body)
    # /distserve/engine_info answers model_dump_json(): JSON inside a JSON string.
    return orjson.loads(value) if isinstance(value, str) else value


def _succeeded(answer: Any) -> bool:
    status = answer.get("status") if isinstance(answer, dict) else None
    return status in (1, "SUCCESS", "1")


@dataclass(frozen=True, slots=True)
class PairResult:
    prefill: str
    decode: str
    status: str  # "connected", "already_connected", "failed"
    detail: str = ""


class PairConnector:
    """Connects (prefill, decode) pairs once for the whole fleet."""

    def __init__(
        self, pd: PDState, call: Call, protocol: int, link_type: int, metrics: DistServeMetrics
    ) -> None:
        self.pd = pd
        self.call = call
        self.protocol = protocol
        self.link_type = link_type
        self.metrics = metrics

    async def ensure(self, prefill: Node, decode: Node) -> str:
        """Return once the pair is connected: "already_connected" or "connected" (by this
        call). Raises :class:`PairError` when it cannot be connected."""
        deadline = time.monotonic() + LOCK_MS / 1000 + 5
        delay = 0.01
        while True:
            token = await self.pd.try_lock(prefill.id, decode.id, LOCK_MS)
            if token == "":
                return "already_connected"
            if token is not None:
                try:
                    await self._connect(prefill, decode)
                except BaseException:
                    with contextlib.suppress(StateError):
                        await asyncio.shield(self.pd.unlock(prefill.id, decode.id, token))
                    raise
                if await self.pd.mark_connected(prefill.id, decode.id, token):
                    return "connected"
                continue  # the lock expired meanwhile: whoever holds it now decides
            if time.monotonic() > deadline:
                raise PairError(f"timed out waiting for {prefill.id} -> {decode.id} to connect")
            await asyncio.sleep(delay)  # another process is connecting the pair
            delay = min(delay * 2, 0.2)

    async def _connect(self, prefill: Node, decode: Node) -> None:
        error: Exception | None = None
        for attempt in range(CONNECT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.2 * 2**attempt)
            try:
                await self._connect_once(prefill, decode)
                self.metrics.connects.inc((("result", "ok"),))
                log.info("connected %s -> %s", prefill.id, decode.id)
                return
            except PairMismatch as exc:
                error = exc
                break  # retrying cannot change a configuration
            except PairError as exc:
                error = exc
        self.metrics.connects.inc((("result", "failed"),))
        raise PairError(f"cannot connect {prefill.id} -> {decode.id}: {error}")

    async def _request(self, node: Node, path: str, body: ControlBody = None) -> Any:
        try:
            status, data = await self.call(node, path, body)
        except Exception as exc:
            raise PairError(f"{path} on {node.id} failed: {exc}") from None
        if status != 200:
            text = data.decode("utf-8", "replace").strip()[:200]
            raise PairError(f"{path} on {node.id} answered {status}: {text}")
        try:
            return _json(data)
        except orjson.JSONDecodeError:
            raise PairError(f"{path} on {node.id} did not answer JSON") from None

    async def _connect_once(self, prefill: Node, decode: Node) -> None:
        p_config, d_config = await asyncio.gather(
            self._request(prefill, "/distserve/engine_info"),
            self._request(decode, "/distserve/engine_info"),
        )
        for node, config in ((prefill, p_config), (decode, d_config)):
            if not isinstance(config, dict) or "tp_size" not in config:
                raise PairError(f"{node.id} answered no engine config")
        if p_config["tp_size"] != d_config["tp_size"]:
            raise PairMismatch(
                f"tensor-parallel sizes differ: {prefill.id} tp={p_config['tp_size']}, "
                f"{decode.id} tp={d_config['tp_size']}"
            )
        rdma = {"with_gdr": True, "link_type": self.link_type}
        answers = []
        for local, remote, lc, rc in (
            (prefill, decode, p_config, d_config),
            (decode, prefill, d_config, p_config),
        ):
            init = {
                "local_engine_id": local.url,
                "local_engine_config": lc,
                "remote_engine_id": remote.url,
                "remote_engine_config": rc,
                "protocol": self.protocol,
                "rdma_config": rdma,
                "nvlink_config": None,
            }
            answer = await self._request(local, "/distserve/p2p_initialize", init)
            if not _succeeded(answer) or "engine_endpoint_info" not in answer:
                raise PairError(f"p2p_initialize on {local.id} did not succeed: {answer!r:.200}")
            answers.append(answer)
        p_init, d_init = answers
        for local, remote, remote_init in ((prefill, decode, d_init), (decode, prefill, p_init)):
            connect = {
                "protocol": self.protocol,
                "remote_engine_id": remote.url,
                "remote_engine_endpoint_info": remote_init["engine_endpoint_info"],
                "remote_kvtransfer_endpoint_info": remote_init.get("kvtransfer_endpoint_info", []),
            }
            answer = await self._request(local, "/distserve/p2p_connect", connect)
            if not _succeeded(answer):
                raise PairError(f"p2p_connect on {local.id} did not succeed: {answer!r:.200}")

    async def warmup(self) -> list[PairResult]:
        """Connect every active (prefill, decode) pair serving a common model."""
        store = self.pd.store
        view = await store.refresh_latest()
        nodes = view.registry.nodes
        active = [n for n in nodes if n.state is NodeState.ACTIVE]
        prefills = [n for n in active if n.role == Role.PREFILL]
        decodes = [n for n in active if n.role == Role.DECODE]
        pairs = [(p, d) for p in prefills for d in decodes if set(p.models) & set(d.models)]

        async def one(p: Node, d: Node) -> PairResult:
            try:
                return PairResult(p.id, d.id, await self.ensure(p, d))
            except (PairError, StoreUnavailable) as exc:
                return PairResult(p.id, d.id, "failed", str(exc))

        return list(await asyncio.gather(*(one(p, d) for p, d in pairs)))
