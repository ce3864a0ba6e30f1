"""Where stored responses live (OpenAI's Responses API): response id -> the node that made it.

An engine that stores a response is the only one that can continue it (``previous_response_id``),
retrieve, cancel or delete it; every replica must send those calls to that node, whatever its
strategy. The map lives in Redis, bounded in age and in count (``response_record.lua``)."""

from __future__ import annotations

from dataclasses import dataclass

from . import scripts
from .store import Store


@dataclass(frozen=True, slots=True)
class ResponseSettings:
    lifetime_ms: int = 24 * 3600 * 1000  # vLLM keeps stored responses until it restarts
    max_entries: int = 1_000_000  # about 150 bytes each in Redis


@dataclass(frozen=True, slots=True)
class Holder:
    """The node holding a response, and the model it was made with."""

    node_id: str
    model: str


def _keys(store: Store) -> list[str]:
    return [store.keys.responses, store.keys.response_times]


async def record(
    store: Store, response_id: str, node_id: str, model: str, settings: ResponseSettings
) -> int:
    """Remember that ``node_id`` holds ``response_id``; returns the entries kept."""
    args = [response_id, node_id, model, settings.lifetime_ms, settings.max_entries]
    return int(await store.run_script(scripts.RESPONSE_RECORD, _keys(store), args))


async def holder(store: Store, response_id: str, settings: ResponseSettings) -> Holder | None:
    """The node that holds ``response_id``; None when unknown, expired or forgotten."""
    found = str(
        await store.run_script(
            scripts.RESPONSE_LOOKUP, _keys(store), [response_id, settings.lifetime_ms]
        )
    )
    if not found:
        return None
    node_id, _, model = found.partition("\n")
    return Holder(node_id, model)


async def forget(store: Store, response_id: str) -> bool:
    return bool(await store.run_script(scripts.RESPONSE_FORGET, _keys(store), [response_id]))
