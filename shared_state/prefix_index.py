"""The prefix index's own operations, over a :class:`Store` (the picks and releases that read
and correct it are :meth:`Store.pick` and :meth:`Store.release` with ``cache_aware``).

Each node has a sorted set of the prompt blocks routed to it, scored by last use (see
:mod:`.prefix` and docs/state.md). Besides the picks, only node removal, the health-checker's
deregistration and recovery, a node registering itself again, and this module change it.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import scripts
from .prefix import MAX_CHAIN_BLOCKS
from .registry import normalize_url
from .store import Store


class PrefixIndex:
    """Operations on the per-node prefix block sets of one :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys

    async def forget(self, url: str, blocks: Sequence[str] = ()) -> int:
        """Remove ``blocks`` from the node's set, or every block when none are given (its
        engine restarted with an empty cache); returns how many were removed."""
        key = self.keys.prefix_blocks(normalize_url(url))
        removed = 0
        # One call per bounded batch; none for "all".
        for first in range(0, max(len(blocks), 1), MAX_CHAIN_BLOCKS):
            batch = list(blocks[first : first + MAX_CHAIN_BLOCKS])
            removed += int(await self.store.run_script(scripts.PREFIX_FORGET, [key], batch))
        return removed
