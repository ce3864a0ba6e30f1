"""The prefix index's arguments: what ``cache_aware`` adds to a pick, and its tunables.

A request's prompt is a chain of block hashes (the gateway derives it; each hash covers every
block before it, as the engines' own KV-block hashes do). Each node has a sorted set of the
blocks routed to it, scored by last use; ``pick_prefix.lua`` finds the longest held prefix
per candidate and records the winner's blocks, ``release.lua`` forgets blocks an engine said
it did not have. This module only builds script arguments (pure: :mod:`.store` runs them);
:mod:`.prefix_index` holds the operations of their own.

Invariant kept by the scripts: a node's set is prefix-closed (it holds a block only with the
blocks before it in every chain that routed it), so the chain is monotone and a binary search
finds the held prefix. Memory is bounded by the capacity in blocks of each node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput

# The most blocks of one chain that reach a script: a longer prompt is indexed by its first
# MAX_CHAIN_BLOCKS blocks only (2048 blocks of 256 bytes: about 128k tokens), so a huge prompt
# costs at most one bounded Lua call. pick_prefix.lua enforces it too.
MAX_CHAIN_BLOCKS = 2048
# What a node's prefix cache keeps (PrefixSettings.whole_prompts): distinct blocks, or whole
# prompts as llama.cpp's llama-server keeps them; the gateway's --prefix-cache-unit.
CACHE_UNITS = ("blocks", "prompts")
# The largest capacity a node may be given: about 100 MB of Redis memory (docs/state.md).
MAX_CAPACITY = 1 << 20


@dataclass(frozen=True, slots=True)
class PrefixSettings:
    """Tunables of the cache_aware pick; every replica must use the same values.

    ``default_capacity_blocks``: a node's capacity when its record has no ``cache_blocks``;
    ``whole_prompts``: the nodes' caches keep whole prompts, each charged in full and moved out
    when a request resumes from it (llama.cpp's llama-server; pick_prefix.lua's "Whole
    prompts"), rather than distinct blocks evicted least recently used first;
    ``balance``: a node takes a request only while its requests in flight (this one included)
    stay within (1 + balance) x the candidates' mean, rounded up, so a hot prefix spreads;
    ``balance_slack``: or within the mean + this, rounded down, whichever is more (at a low
    load the relative bound alone is 1, and a chat's next turn would leave its busy node for
    one that must prefill the whole prompt, where waiting for one request costs far less);
    ``request_blocks``: the cost of one request in flight on a node, in blocks of prefill;
    ``evict_cost``: the cost of evicting one block of another prompt from a full node, in
    blocks of prefill (1: it will be prefilled again; a partial hit on a full node then beats
    room elsewhere only when it covers more than half the prompt, SGLang's cache threshold);
    ``touch_ms``: blocks used more recently than this keep their last-use time when a pick
    finds them held (LRU to within a second; a hot prefix then costs a pick O(new blocks)).
    """

    default_capacity_blocks: int = 4096
    whole_prompts: bool = False
    balance: float = 0.5
    balance_slack: float = 2.0
    request_blocks: float = 4.0
    evict_cost: float = 1.0
    touch_ms: int = 1000


def pick_args(settings: PrefixSettings, blocks: Sequence[str]) -> list[Any]:
    """pick_prefix.lua's ARGV after the 13 it shares with pick.lua."""
    return [
        settings.default_capacity_blocks,
        settings.balance,
        settings.request_blocks,
        settings.evict_cost,
        settings.touch_ms,
        settings.balance_slack,
        "prompts" if settings.whole_prompts else "blocks",
        *blocks[:MAX_CHAIN_BLOCKS],
    ]


def release_args(forget: Sequence[str]) -> list[Any]:
    """release.lua's ARGV[10..]: how many blocks to forget, then their hashes."""
    hashes = list(forget[:MAX_CHAIN_BLOCKS])
    return [len(hashes), *hashes]


def validate_capacity(value: object) -> int:
    """A node's prefix-cache capacity in blocks: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CAPACITY:
        raise InvalidInput(f"cache_blocks must be an integer from 1 to {MAX_CAPACITY}")
    return value
