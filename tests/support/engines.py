"""Real engines for the end-to-end tests against them (tests/e2e/engines): llama.cpp's
``llama-server`` processes and vLLM's OpenAI server, built, given a model and started through
``scripts.engine``, as an operator would with ``scripts/engines.py``, then watched through
their own HTTP endpoints."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from scripts.engine import cache, llama, vllm
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


@dataclass(frozen=True, slots=True)
class VllmServer:
    """A vLLM OpenAI server, ready."""

    process: Process
    url: str
    loading_answers: frozenset[str]  # what /health said before it answered 200

    def metric(self, name: str) -> float:
        """The sum of every sample of ``name`` on its ``/metrics``."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ")
        )


class VllmStart:
    """vLLM's OpenAI server serving the tiny model on a free loopback port, started now (its
    environment and model prepared first if the cache has none) and left loading: it takes
    40 s or more. A watcher process (tests/support/health_watch.py) records what its
    ``/health`` answers until it is ready. If it cannot be prepared, :attr:`error` says why."""

    def __init__(self) -> None:
        self.error = ""
        try:
            root = cache.root()
            python = vllm.prepare_env(root)
            model = vllm.make_model(root)
        except cache.EngineUnavailable as exc:
            self.error = f"vLLM is not available here: {exc}"
            return
        port = free_port()
        argv, env = vllm.start_command(python, model, port)
        self.url = f"http://127.0.0.1:{port}"
        self.process = Process(argv, f"vllm-{port}", env)
        watch = [sys.executable, "-m", "tests.support.health_watch", self.url]
        self.watcher = Process([*watch, str(vllm.START_TIMEOUT_S)], f"vllm-watch-{port}")

    def ready(self) -> VllmServer:
        """Wait until it answers ``/health`` with 200; RuntimeError with the reason if it
        cannot be prepared, exits or is not ready within ``vllm.START_TIMEOUT_S``."""
        if self.error:
            raise RuntimeError(self.error)
        while self.watcher.alive():
            if not self.process.alive():
                raise RuntimeError(f"vLLM exited while starting:\n{self.process.output()[-4000:]}")
            time.sleep(0.2)
        answers = self.watcher.output().split()
        if self.watcher.proc.returncode != 0 or answers[-1:] != ["200"]:
            waited = f"{vllm.START_TIMEOUT_S:.0f} s"
            raise RuntimeError(f"vLLM not ready after {waited}:\n{self.process.output()[-4000:]}")
        return VllmServer(self.process, self.url, frozenset(answers[:-1]))

    def close(self) -> None:
        if not self.error:
            self.watcher.close()
            self.process.close()
