"""Real llama.cpp ``llama-server``s for the routing benchmark's engine scenario: what each is
given (CPU threads, request slots, prompt-cache RAM), started from the engines cache through
scripts.engine on loopback ports, restarted empty between set-ups, and read through their own
``/health`` and ``/metrics``.

Invariants:

- An engine keeps its port across restarts, so its URL (the gateways' node id) names the same
  engine in every run; a restart empties its slots, its prompt cache and its counters, so every
  set-up starts on the same cold engines and its counters count that set-up alone.
- Nothing here builds: the binary and the model come from scripts.engine, made once into the
  engines cache outside the repository (minutes the first time), or the scenario stops with
  the one-line reason it gives.
- An engine's prompt cache is bounded (``--cache-ram``): llama-server keeps the KV state of
  whole prompts there, least recently used first out, so a node holds a few conversations'
  prefixes, not all of them, as a GPU's KV memory holds a few in a real fleet.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from scripts.bench.harness import Child, Processes, StartupError, free_port
from scripts.bench.hits import PromptTokens, engine_tokens, parse_metrics
from scripts.engine import cache, gguf_model, llama

START_TIMEOUT_S = 60.0
MIB = 1 << 20
KV_BYTES = 2  # llama-server's KV cache is f16 unless told otherwise


@dataclass(frozen=True, slots=True)
class LlamaSpec:
    """One engine: CPU ``threads``, request slots (``parallel``), the MiB of RAM its prompt
    cache may take (``cache_mib``) and whether it saves every prompt there (``save_prompts``).

    llama-server's default hands a request the idle slot whose prompt it shares most of (at
    least 10%) and, when that keeps half or more of the slot's prompt, overwrites the rest
    without saving it: a chat sharing its system prompt with the one before it on that engine
    loses its own history there. ``save_prompts`` turns that choice off
    (``--slot-prompt-similarity 0``): the slot's prompt is saved to the prompt cache before each
    request, and the request resumes the saved prompt it shares most of."""

    name: str
    threads: int
    parallel: int
    cache_mib: int
    save_prompts: bool = False

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "threads": self.threads,
            "parallel": self.parallel,
            "cache_mib": self.cache_mib,
            "save_prompts": self.save_prompts,
        }


# Two alike engines, one thread each: both fit this machine's two cores. 96 MiB of prompt cache
# holds about six conversations' KV state of the default chats (16 KiB per token of llama-big).
DEFAULT_LLAMAS = (LlamaSpec("llama-1", 1, 1, 96), LlamaSpec("llama-2", 1, 1, 96))


def parse_llamas(text: str) -> tuple[LlamaSpec, ...]:
    """``name:threads:parallel:cache_mib[:save]`` items, comma-separated (``save``: the engine
    saves every prompt to its prompt cache, see :class:`LlamaSpec`)."""
    specs = []
    for item in text.split(","):
        name, threads, parallel, cache_mib, *rest = item.strip().split(":")
        if rest not in ([], ["save"]):
            raise ValueError(f"{item.strip()!r}: after cache_mib only ':save' may follow")
        specs.append(LlamaSpec(name, int(threads), int(parallel), int(cache_mib), bool(rest)))
    if not specs or len({s.name for s in specs}) != len(specs):
        raise ValueError("engine names must be distinct")
    if any(s.threads < 1 or s.parallel < 1 or s.cache_mib < 0 for s in specs):
        raise ValueError("threads and parallel >= 1, cache_mib >= 0")
    return tuple(specs)


def kv_bytes_per_token(model: str) -> int:
    """Bytes of KV cache one token takes in ``model`` (keys and values of every layer)."""
    spec = gguf_model.SPECS[model]
    kv_width = spec.width // spec.heads * spec.kv_heads
    return 2 * spec.layers * kv_width * KV_BYTES


def model_shape(model: str) -> str:
    """``model``'s layers and width, and its weights' type, in words."""
    spec = gguf_model.SPECS[model]
    return f"{spec.layers} layers x {spec.width}, f16"


@dataclass(frozen=True, slots=True)
class LlamaBuild:
    """The engine binary and the model file it serves, under the name ``model``."""

    binary: Path
    model_path: Path
    model: str


def prepare(model: str) -> LlamaBuild:
    """The pinned ``llama-server`` and ``model`` from the engines cache (built or made first
    if missing); :class:`StartupError` with the reason when that cannot be done here."""
    try:
        return LlamaBuild(llama.build(), llama.model(model), model)
    except cache.EngineUnavailable as exc:
        raise StartupError(f"llama-server is not available here: {exc}") from None


class LlamaFleet:
    """The scenario's engines: started, restarted empty, and read."""

    def __init__(self, procs: Processes, build: LlamaBuild) -> None:
        self.procs = procs
        self.build = build
        self.specs: dict[str, LlamaSpec] = {}
        self.children: dict[str, Child] = {}
        self.ports: dict[str, int] = {}

    def command(self, spec: LlamaSpec, port: int) -> list[str]:
        """The command line of ``spec``'s engine on ``port``."""
        argv = llama.server_command(
            self.build.binary,
            self.build.model_path,
            port=port,
            alias=self.build.model,
            parallel=spec.parallel,
            threads=spec.threads,
        )
        argv += ["--cache-ram", str(spec.cache_mib)]
        if spec.save_prompts:
            argv += ["--slot-prompt-similarity", "0"]
        return argv

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def names(self) -> dict[str, str]:
        """Engine URL -> name, as the gateways name nodes in ``x-fleetgate-node``."""
        return {self.url(name): name for name in self.specs}

    def _spawn(self, spec: LlamaSpec) -> Child:
        port = self.ports.setdefault(spec.name, free_port())
        child = self.procs.start(f"engine-{spec.name}", self.command(spec, port), port)
        self.children[spec.name] = child
        return child

    async def start(self, session: aiohttp.ClientSession, specs: tuple[LlamaSpec, ...]) -> None:
        """Start an engine per spec and wait until each answers ``/health``."""
        for spec in specs:
            self.specs[spec.name] = spec
            self._spawn(spec)
        await self.wait_healthy(session)

    async def restart(self, session: aiohttp.ClientSession) -> None:
        """Stop every engine and start it again on its port, empty; wait until healthy."""
        self.procs.stop(self.children.values())
        for spec in self.specs.values():
            self._spawn(spec)
        await self.wait_healthy(session)

    async def wait_healthy(self, session: aiohttp.ClientSession) -> None:
        """Return once every engine's ``/health`` answers 200 (it answers 503 while the model
        loads, and nothing at all before it listens)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for name, child in self.children.items():
            while True:
                if not child.alive():
                    raise StartupError(f"engine {name} exited:\n{child.tail()}")
                try:
                    async with session.get(child.url + "/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise StartupError(f"engine {name} not healthy:\n{child.tail()}")
                await asyncio.sleep(0.05)

    async def metrics(self, session: aiohttp.ClientSession, name: str) -> dict[str, float]:
        """Engine ``name``'s ``/metrics``, parsed."""
        async with session.get(self.url(name) + "/metrics") as resp:
            return parse_metrics(await resp.text())

    async def tokens(self, session: aiohttp.ClientSession) -> dict[str, PromptTokens]:
        """Prompt and cached tokens each engine has counted since it (re)started."""
        out = {}
        for name in self.specs:
            counted = engine_tokens(await self.metrics(session, name))
            if counted is None:
                raise StartupError(f"engine {name} exports no prompt-token counters")
            out[name] = counted
        return out

    async def wait_idle(self, session: aiohttp.ClientSession, timeout_s: float = 60.0) -> bool:
        """Wait until no engine processes or defers a request; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = 0.0
            for name in self.specs:
                m = await self.metrics(session, name)
                busy += m.get("llamacpp:requests_processing", 0.0)
                busy += m.get("llamacpp:requests_deferred", 0.0)
            if busy == 0:
                return True
            await asyncio.sleep(0.1)
        return False
