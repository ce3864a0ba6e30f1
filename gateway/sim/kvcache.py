"""The simulated engine's KV cache with prefix caching, and the prefill it saves
(``--cache-blocks``, ``--block-tokens``, ``--prefill-tokens-per-s``), modelled on vLLM's.

- **Tokens**: the node's tokenizer stand-in, one token per whitespace word, the count that
  ``usage.prompt_tokens`` reports (:func:`~gateway.sim.answers.count_words`). A completion's
  tokens are its prompt's words (a batch's prompts as one sequence); a chat's are its messages'
  words through a template of role and content in order: each word carries its message's
  position and role, so the same words under another role or in another message are other
  tokens, as behind a real chat template, while the template costs no token of its own and
  ``cached_tokens <= prompt_tokens`` holds.
- **Blocks**: tokens cut into blocks of ``block_tokens``; a full block is named by a hash
  chained over the block before it (the first over the model's name), so two prompts share a
  block only behind an identical prefix. A partial last block is never cached.
- **Cache**: at most ``capacity`` blocks. A block used by a sequence being prefilled or decoded
  is *held* (reference counted) and never evicted; the others wait in LRU order and the least
  recently used goes first when a new block needs room. When every block is held, the rest of
  a prompt is computed but not cached. A finished sequence's blocks are freed last block first
  (vLLM's free-queue order), so a prompt's tail is evicted before its head and the cache keeps
  prefixes. A sequence that completed also caches the full blocks of its answer, which a chat's
  next turn sends back as an assistant message.
- **Hits**: the leading blocks of a prompt found in the cache when its prefill starts, at most
  ``prompt_tokens - 1`` tokens (the engine computes the last token again to have logits to
  sample from), so a repeated prompt hits its block-aligned prefix. The full blocks its
  prefill then caches that were not there are its ``created`` tokens (vLLM's
  ``created_cache_tokens``).
- **Prefill**: the uncached tokens over ``prefill_tokens_per_s`` seconds, one prefill at a time
  in arrival order (prefills compete for the engine); decoding follows as without the cache.
- **Counters**, in tokens as vLLM counts them: every prompt token queried, every cached token a
  hit, so over completed requests ``hits`` is the sum of the ``cached_tokens`` reported.

Invariants: ``len(cache) <= capacity``; a held block is never evicted; every block a sequence
holds is released exactly once (:meth:`PrefixEngine.finish`); ``hits <= queries``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .answers import prompt_words
from .metrics import series

_SEP = "\x1f"  # between a chat token's position, role and word: none of them can forge another


def chat_tokens(messages: object) -> list[str]:
    """The tokens of chat ``messages``: each message's words tagged with its position and role."""
    if not isinstance(messages, list):
        return prompt_words(messages)
    tokens: list[str] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        tag = f"{i}{_SEP}{role if isinstance(role, str) else ''}{_SEP}"
        tokens += [tag + word for word in prompt_words(message)]
    return tokens


def request_tokens(kind: str, body: dict[str, Any]) -> list[str]:
    """The prompt tokens of a chat (``kind == "chat"``) or text completion request."""
    if kind == "chat":
        return chat_tokens(body.get("messages"))
    return prompt_words(body.get("prompt"))


def answer_tokens(kind: str, body: dict[str, Any], text: str) -> list[str]:
    """The tokens ``text``, the answer to ``body``, adds to its prompt: a chat's next turn sends
    it back as the assistant message after the last one."""
    if kind != "chat":
        return text.split()
    messages = body.get("messages")
    tag = f"{len(messages) if isinstance(messages, list) else 0}{_SEP}assistant{_SEP}"
    return [tag + word for word in text.split()]


def block_hashes(model: str, tokens: list[str], block_tokens: int) -> list[bytes]:
    """The chained hashes of the full blocks of ``tokens``: blake2b over the previous block's
    hash (the model's name for the first) and the block's tokens."""
    digest = hashlib.blake2b(model.encode(), digest_size=16).digest()
    hashes: list[bytes] = []
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        step = hashlib.blake2b(digest, digest_size=16)
        for token in tokens[start : start + block_tokens]:
            step.update(token.encode())
            step.update(b"\0")  # word boundaries: ("ab", "c") is not ("a", "bc")
        digest = step.digest()
        hashes.append(digest)
    return hashes


def prefill_seconds(uncached_tokens: int, tokens_per_s: float) -> float:
    """The time to prefill ``uncached_tokens`` at ``tokens_per_s`` (0 or inf: no time)."""
    if tokens_per_s == 0 or math.isinf(tokens_per_s) or uncached_tokens <= 0:
        return 0.0
    return uncached_tokens / tokens_per_s


class BlockCache:
    """An LRU cache of ``capacity`` blocks whose held blocks are never evicted."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: dict[bytes, int] = {}  # block -> sequences holding it
        self._free: OrderedDict[bytes, None] = OrderedDict()  # unheld, least recent first
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._held) + len(self._free)

    def __contains__(self, block: object) -> bool:
        return block in self._held or block in self._free

    @property
    def held(self) -> int:
        """Blocks held by at least one sequence."""
        return len(self._held)

    def match(self, blocks: Iterable[bytes]) -> int:
        """How many leading ``blocks`` the cache holds (a miss ends the prefix)."""
        n = 0
        for block in blocks:
            if block not in self:
                break
            n += 1
        return n

    def acquire(self, blocks: Iterable[bytes]) -> list[bytes]:
        """Hold ``blocks`` in order, caching the missing ones (evicting the least recently used
        unheld blocks for room), until one finds no room; returns the blocks now held."""
        got: list[bytes] = []
        for block in blocks:
            if block in self._held:
                self._held[block] += 1
            elif block in self._free:
                del self._free[block]
                self._held[block] = 1
            else:
                if len(self) >= self.capacity:
                    if not self._free:
                        break  # every block is held: the rest is computed, not cached
                    self._free.popitem(last=False)
                    self.evicted += 1
                self._held[block] = 1
            got.append(block)
        return got

    def clear(self) -> int:
        """Forget every block no sequence holds; returns how many."""
        dropped = len(self._free)
        self._free.clear()
        return dropped

    def release(self, blocks: list[bytes]) -> None:
        """Let go of ``blocks`` (as :meth:`acquire` returned them); the last is freed first,
        so it is evicted before the ones ahead of it."""
        for block in reversed(blocks):
            left = self._held[block] - 1
            if left:
                self._held[block] = left
            else:
                del self._held[block]
                self._free[block] = None


@dataclass(slots=True)
class Prefilled:
    """One request in the engine: its prompt, what the cache held of it, the blocks it holds."""

    model: str
    tokens: list[str]
    reserved: int  # blocks its prompt and answer take, whether cached or not
    full: int = 0  # full blocks of its prompt
    cached: int = 0  # prompt tokens found in the cache
    created: int = 0  # prompt tokens its prefill cached anew (whole blocks)
    prefill_s: float = 0.0  # what its prefill cost, waiting for the engine aside
    blocks: list[bytes] = field(default_factory=list)  # held in the cache
    done: bool = False


@dataclass(slots=True)
class _Counts:
    queries: int = 0
    hits: int = 0


class PrefixEngine:
    """The cache and the prefill of one simulated engine (shared by its models, whose chains
    never meet), with vLLM's counters per model."""

    def __init__(
        self, capacity: int, block_tokens: int, prefill_tokens_per_s: float, models: Iterable[str]
    ) -> None:
        self.cache = BlockCache(capacity)
        self.block_tokens = block_tokens
        self.tokens_per_s = prefill_tokens_per_s
        self.counts = {model: _Counts() for model in models}
        self._reserved = 0  # blocks the running sequences take beyond those they hold
        self._lock = asyncio.Lock()  # one prefill at a time, first come first served
        self.prefill_s = 0.0
        self.prefill_tokens = 0

    async def prefill(
        self,
        model: str,
        tokens: list[str],
        max_answer: int,
        sleep: Callable[[float], Awaitable[None]],
        factor: float = 1.0,
    ) -> Prefilled:
        """Admit a sequence: wait for the engine, look its prompt up, hold the hits, spend the
        uncached tokens' prefill time through ``sleep`` (``factor`` times slower), then cache
        and hold the rest. The caller must :meth:`finish` it, whatever happens later; if
        ``sleep`` raises, nothing stays held."""
        size = self.block_tokens
        seq = Prefilled(model, tokens, -(-(len(tokens) + max_answer) // size))
        blocks = block_hashes(model, tokens, size)
        seq.full = len(blocks)
        async with self._lock:
            hit = self.cache.match(blocks[: max(len(tokens) - 1, 0) // size])
            seq.blocks = self.cache.acquire(blocks[:hit])
            seq.cached = hit * size
            counts = self.counts[model]
            counts.queries += len(tokens)
            counts.hits += seq.cached
            uncached = len(tokens) - seq.cached
            seq.prefill_s = prefill_seconds(uncached, self.tokens_per_s) * factor
            try:
                await sleep(seq.prefill_s)
            except BaseException:
                self.cache.release(seq.blocks)
                raise
            fresh = [block not in self.cache for block in blocks[hit:]]
            added = self.cache.acquire(blocks[hit:])
            seq.created = sum(fresh[: len(added)]) * size
            seq.blocks += added
            self.prefill_s += seq.prefill_s
            self.prefill_tokens += uncached
        self._reserved += seq.reserved - len(seq.blocks)
        return seq

    def finish(self, seq: Prefilled, answer: list[str] | None) -> None:
        """The sequence ends: with ``answer`` (its tokens) when it completed, whose full blocks
        are cached too; its blocks are released. A second call does nothing."""
        if seq.done:
            return
        seq.done = True
        self._reserved -= seq.reserved - len(seq.blocks)
        if answer and len(seq.blocks) == seq.full:  # its answer continues a prompt all cached
            blocks = block_hashes(seq.model, seq.tokens + answer, self.block_tokens)
            seq.blocks += self.cache.acquire(blocks[seq.full :])
        self.cache.release(seq.blocks)

    def kv_usage(self) -> float:
        """vLLM's ``kv_cache_usage_perc``: the blocks running sequences take (their prompt's
        held blocks, shared, and the rest of prompt and answer reserved at admission) over the
        capacity, at most 1; cached blocks no sequence holds are free to take."""
        if self.cache.capacity == 0:
            return 0.0
        return min((self.cache.held + self._reserved) / self.cache.capacity, 1.0)

    @property
    def hits(self) -> int:
        return sum(c.hits for c in self.counts.values())

    def stats(self) -> dict[str, Any]:
        cache = self.cache
        return {
            "capacity": cache.capacity,
            "block_tokens": self.block_tokens,
            "blocks": len(cache),
            "held": cache.held,
            "evicted": cache.evicted,
            "queries": sum(c.queries for c in self.counts.values()),
            "hits": self.hits,
            "prefill_tokens": self.prefill_tokens,
            "prefill_s": self.prefill_s,
        }

    def metric_lines(self) -> list[str]:
        """vLLM's prefix-cache counters, per model."""
        queries = {model: c.queries for model, c in self.counts.items()}
        hits = {model: c.hits for model, c in self.counts.items()}
        return [
            *series(
                "vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up.", queries
            ),
            *series("vllm:prefix_cache_hits_total", "counter", "Of them cached.", hits),
        ]
