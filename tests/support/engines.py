"""Real llama.cpp ``llama-server`` processes for the end-to-end tests against real engines
(tests/e2e/engines): built, given a model and started through ``scripts.engine``, as an
operator would with ``scripts/engines.py``, then watched through their own HTTP endpoints."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from scripts.engine import llama
from tests.support.harness import free_port
from tests.support.processes import Process

MODEL_NAME = "llama-tiny"
"""The model the engine tests serve: two layers, 64 wide, ready in about a second."""


@dataclass(frozen=True, slots=True)
class LlamaBuild:
    """What starting a ``llama-server`` needs: the binary and the model file it serves."""

    binary: Path
    model: Path
    name: str


def prepare(model: str = MODEL_NAME) -> LlamaBuild:
    """The pinned ``llama-server`` and ``model`` from the cache, built or made first if missing
    (minutes); :class:`scripts.engine.cache.EngineUnavailable` when that cannot be done here."""
    return LlamaBuild(llama.build(), llama.model(model), model)


class LlamaServer(Process):
    """One ``llama-server`` on a loopback port (a free one unless given), its own process
    group; ``parallel`` request slots, one CPU thread (two engines share this machine's two
    cores), ``/metrics`` and ``/slots`` on."""

    def __init__(
        self, build: LlamaBuild, *, port: int | None = None, parallel: int = 2, threads: int = 1
    ) -> None:
        self.build = build
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = llama.server_command(
            build.binary,
            build.model,
            port=self.port,
            alias=build.name,
            parallel=parallel,
            threads=threads,
        )
        super().__init__(command, f"llama-{self.port}")

    def wait_ready(self, timeout_s: float = 60.0) -> LlamaServer:
        """Return once ``/health`` answers 200 (it answers 503 while the model loads)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"llama-server exited:\n{self.output()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"llama-server not ready after {timeout_s}s:\n{self.output()[-4000:]}")

    def slots(self) -> list[dict[str, Any]]:
        """Its ``/slots``: one object per request slot (``is_processing``, ``n_ctx``, ...)."""
        response = httpx.get(f"{self.url}/slots", timeout=5)
        response.raise_for_status()
        listing: list[dict[str, Any]] = response.json()
        return listing

    def busy_slots(self) -> int:
        return sum(1 for slot in self.slots() if slot.get("is_processing"))

    def metrics_text(self) -> str:
        response = httpx.get(f"{self.url}/metrics", timeout=5)
        response.raise_for_status()
        return response.text

    def metric(self, name: str) -> float:
        """The value of the unlabelled sample ``name`` on its ``/metrics`` (``llamacpp:...``)."""
        for line in self.metrics_text().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)
