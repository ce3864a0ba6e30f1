"""What the real engines can take, measured before the engine scenario runs, and what follows:
the rate it offers, and the speed and prefix-cache capacity the gateways are told.

Each engine answers, all engines at once as they will run under load, after one turn not
counted, a few first turns whose system prompt it does not hold (a cold prefill of the whole
prompt) and, after each, a first turn of another conversation on the same system prompt (the
prompt found in its cache).

Invariants:

- Calibration prompts are system prompts the chats never use (numbers from
  :data:`CALIBRATION_PROMPTS` on), and engines are restarted before every set-up anyway.
- The fleet's cold capacity, the sum over engines of one over the median cold-turn time, is what
  it serves if no prefix were ever reused: a rate below it is one every strategy can serve,
  however it routes. Rates are fractions of it.
- A node's registered ``speed`` is what an operator would register: its CPU threads times the
  engines' median cold prompt tokens per second per thread (what dominates a turn's cost).
  Engines given the same threads get the same speed: a calibration's noise of a few percent
  must not rank alike engines, or ``min_expected_latency`` would send an idle fleet's every
  request to the one measured faster.
- A node's ``cache_blocks`` is the prompt text its KV memory holds, in the gateway's blocks:
  its prompt cache's RAM over the model's KV bytes per token, plus one prompt per slot, times
  the measured bytes of prompt text per token. It counts tokens as a GPU's memory would;
  llama-server keeps whole prompts, so prompts sharing a system prompt each take it again.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from scripts.bench.chat_load import ChatResult, request_body, send_turn
from scripts.bench.chats import ChatTurn, ChatWorkload
from scripts.bench.harness import StartupError
from scripts.bench.llama_nodes import MIB, LlamaFleet, LlamaSpec, kv_bytes_per_token

CALIBRATION_PROMPTS = 1000
DEFAULT_BLOCK_BYTES = 256  # the gateway's --prefix-block-bytes default


@dataclass
class EngineCalibration:
    """One engine's cold and cached first-turn times, s, and the prompt's tokens."""

    name: str
    miss_s: list[float] = field(default_factory=list)
    hit_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    hit_cached_tokens: int = 0

    @property
    def miss_median_s(self) -> float:
        return statistics.median(self.miss_s)

    @property
    def hit_median_s(self) -> float:
        return statistics.median(self.hit_s)

    @property
    def cold_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.miss_median_s


@dataclass
class Calibration:
    """Every engine's calibration and the bytes of prompt text per token."""

    engines: dict[str, EngineCalibration]
    bytes_per_token: float

    @property
    def cold_capacity_rps(self) -> float:
        """Turns/s the fleet answers when no prefix is ever reused."""
        return sum(1 / e.miss_median_s for e in self.engines.values())

    def speed(self, spec: LlamaSpec, specs: Sequence[LlamaSpec]) -> float:
        """The ``speed`` engine ``spec`` is registered with (see the module's docstring)."""
        per_thread = statistics.median(
            self.engines[s.name].cold_tokens_per_s / s.threads for s in specs
        )
        return round(spec.threads * per_thread, 1)

    def cache_blocks(self, spec: LlamaSpec, model: str, block_bytes: int) -> int:
        """The prompt blocks engine ``spec`` holds (see the module's docstring)."""
        prompt_tokens = self.engines[spec.name].prompt_tokens
        tokens = spec.cache_mib * MIB / kv_bytes_per_token(model) + spec.parallel * prompt_tokens
        return max(1, round(tokens * self.bytes_per_token / block_bytes))

    def describe(self) -> dict[str, Any]:
        return {
            "engines": {
                name: {
                    "miss_ms": [round(s * 1000, 1) for s in e.miss_s],
                    "hit_ms": [round(s * 1000, 1) for s in e.hit_s],
                    "miss_median_ms": round(e.miss_median_s * 1000, 1),
                    "hit_median_ms": round(e.hit_median_s * 1000, 1),
                    "prompt_tokens": e.prompt_tokens,
                    "hit_cached_tokens": e.hit_cached_tokens,
                    "cold_tokens_per_s": round(e.cold_tokens_per_s, 1),
                }
                for name, e in self.engines.items()
            },
            "bytes_per_token": round(self.bytes_per_token, 3),
            "cold_capacity_rps": round(self.cold_capacity_rps, 3),
        }


def _text_bytes(body: dict[str, Any]) -> int:
    return sum(len(m["content"].encode()) for m in body["messages"])


async def _engine(
    session: aiohttp.ClientSession,
    base: str,
    name: str,
    first_prompt: int,
    workload: ChatWorkload,
    model: str,
    rounds: int,
) -> tuple[EngineCalibration, list[tuple[int, int]]]:
    cal = EngineCalibration(name)
    sizes: list[tuple[int, int]] = []
    # A first request pays for what an engine sets up once (buffers, the chat template): not
    # what a turn costs.
    warm = ChatTurn(0.0, 0, 0, first_prompt + rounds, False, 0.0)
    res = ChatResult(warm, 0)
    await send_turn(session, base, request_body(model, workload, 999, warm, []), res)
    if not res.ok:
        raise StartupError(f"calibrating {name}: {res.error}: {res.detail}")
    for i in range(rounds):
        for chat, kind in ((0, "miss"), (1, "hit")):
            turn = ChatTurn(0.0, chat, 0, first_prompt + i, False, 0.0)
            body = request_body(model, workload, 1000 + i, turn, [])
            res = ChatResult(turn, 0)
            await send_turn(session, base, body, res)
            if not res.ok:
                raise StartupError(f"calibrating {name}: {res.error}: {res.detail}")
            (cal.miss_s if kind == "miss" else cal.hit_s).append(res.latency)
            if kind == "miss":
                cal.prompt_tokens = res.tokens.prompt
                sizes.append((_text_bytes(body), res.tokens.prompt))
            else:
                cal.hit_cached_tokens = res.tokens.cached
    return cal, sizes


async def calibrate(
    session: aiohttp.ClientSession,
    fleet: LlamaFleet,
    workload: ChatWorkload,
    rounds: int = 3,
) -> Calibration:
    """Time ``rounds`` cold and cached first turns on every engine at once."""
    names: Sequence[str] = list(fleet.specs)
    done = await asyncio.gather(
        *(
            _engine(
                session,
                fleet.url(name),
                name,
                CALIBRATION_PROMPTS + i * (rounds + 1),
                workload,
                fleet.build.model,
                rounds,
            )
            for i, name in enumerate(names)
        )
    )
    sizes = [s for _cal, engine_sizes in done for s in engine_sizes]
    per_token = sum(b for b, _t in sizes) / sum(t for _b, t in sizes)
    return Calibration({cal.name: cal for cal, _sizes in done}, per_token)
