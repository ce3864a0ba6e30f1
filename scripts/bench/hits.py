"""Prefix-cache hit rates as the engines count them: from each answer's usage (OpenAI's
``usage.prompt_tokens_details.cached_tokens``) and from the engines' own Prometheus counters
(llama.cpp's and vLLM's names; the simulated nodes mirror them).

Invariants:

- A hit rate is cached prompt tokens over all prompt tokens, weighted by tokens: a turn that
  re-sends a 1,000-token history weighs more than a 50-token question. With no prompt tokens
  it is NaN, never 0: nothing was asked, so nothing missed.
- llama.cpp's ``llamacpp:prompt_tokens_total`` counts only the tokens it prefilled, so its
  prompt tokens are that plus ``llamacpp:prompt_tokens_cached_total``; vLLM's
  ``vllm:prefix_cache_queries_total`` counts every prompt token looked up and
  ``vllm:prefix_cache_hits_total`` those found. Counters of several label sets (vLLM's per
  model) are added up.
- Counters only grow while an engine lives: the tokens of an interval are the difference of two
  readings of the same process; a reading that went down means the engine restarted between
  them, and the difference is then refused rather than reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

LLAMA_PREFILLED = "llamacpp:prompt_tokens_total"
LLAMA_CACHED = "llamacpp:prompt_tokens_cached_total"
VLLM_QUERIES = "vllm:prefix_cache_queries_total"
VLLM_HITS = "vllm:prefix_cache_hits_total"


class CounterReset(ValueError):
    """A counter went down between two readings: the engine restarted in between."""


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """Prompt tokens sent and how many of them the engine found in its cache."""

    prompt: int = 0
    cached: int = 0

    @property
    def hit_rate(self) -> float:
        """``cached / prompt``; NaN when there were no prompt tokens."""
        return self.cached / self.prompt if self.prompt else math.nan

    def __add__(self, other: PromptTokens) -> PromptTokens:
        return PromptTokens(self.prompt + other.prompt, self.cached + other.cached)


def usage_tokens(usage: Mapping[str, Any] | None) -> PromptTokens:
    """The prompt and cached tokens of one answer's ``usage`` (zeros where a field is absent:
    an engine that reports no ``prompt_tokens_details`` cached nothing it admits to)."""
    if not usage:
        return PromptTokens()
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return PromptTokens(int(usage.get("prompt_tokens") or 0), int(cached or 0))


def total(parts: Iterable[PromptTokens]) -> PromptTokens:
    """The sum of ``parts``."""
    out = PromptTokens()
    for part in parts:
        out = out + part
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as sample name -> value, the samples of one name over its label sets
    added up; comments and lines that do not parse are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        try:
            number = float(value)
        except ValueError:
            continue
        if name:
            out[name] = out.get(name, 0.0) + number
    return out


def engine_tokens(metrics: Mapping[str, float]) -> PromptTokens | None:
    """The prompt and cached tokens an engine has counted since it started, from its parsed
    ``/metrics``; None when it exports neither llama.cpp's nor vLLM's counters."""
    if LLAMA_PREFILLED in metrics and LLAMA_CACHED in metrics:
        cached = int(metrics[LLAMA_CACHED])
        return PromptTokens(int(metrics[LLAMA_PREFILLED]) + cached, cached)
    if VLLM_QUERIES in metrics and VLLM_HITS in metrics:
        return PromptTokens(int(metrics[VLLM_QUERIES]), int(metrics[VLLM_HITS]))
    return None


def delta(before: PromptTokens, after: PromptTokens) -> PromptTokens:
    """The tokens counted between two readings of one engine; :class:`CounterReset` if a
    counter went down (the engine restarted in between)."""
    if after.prompt < before.prompt or after.cached < before.cached:
        raise CounterReset(f"counters went down from {before} to {after}")
    return PromptTokens(after.prompt - before.prompt, after.cached - before.cached)
