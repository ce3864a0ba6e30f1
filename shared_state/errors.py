"""Errors raised by the shared state, each knowing its HTTP status and OpenAI error type, and
which Redis error replies mean that the store is unavailable."""

from __future__ import annotations

import re

import redis.exceptions as rexc


class StateError(Exception):
    """Base of every shared-state error."""

    status_code = 500
    error_type = "server_error"
    code = "state_error"


class NodesFull(Exception):
    """No node could take a pick: the fitting ones are at their ``max_inflight``, or requests
    wait in the fleet's queue (which this one must join). Not an error: the router queues."""

    def __init__(self, nodes: int) -> None:
        super().__init__(f"{nodes} fitting node(s) at capacity")
        self.nodes = nodes  # fitting nodes at capacity (1 when only waiting requests said so)


class InvalidInput(StateError):
    """A value given to the shared state is malformed; nothing was changed."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class UnknownStrategy(InvalidInput):
    code = "unknown_strategy"


class UnknownNode(StateError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "node_not_found"


class UnknownKey(StateError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "key_not_found"


class StoreUnavailable(StateError):
    """The store did not answer in time, refused the connection or this client's login, or
    serves nothing for a while (loading, busy)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "store_unavailable"


class StoreRefusingWrites(StoreUnavailable):
    """The store answers but refuses writes: out of memory under ``noeviction`` (OOM), a
    replica after a fail-over (READONLY), a failed snapshot (MISCONF), too few replicas."""

    code = "store_refusing_writes"


class StoreReadOnly(StoreRefusingWrites):
    """The server behind the store's address is a replica now: a fail-over moved the master,
    and a new connection to the same address (a moved VIP or DNS name) may find it."""


class Fenced(StateError):
    """A write by a health-checker that no longer holds the leader lease; nothing changed."""

    status_code = 409
    error_type = "conflict"
    code = "fenced"


# Error replies by which a live Redis refuses writes: out of memory under noeviction (it also
# refuses anything queued in MULTI then), a replica (a fail-over moved the master), a failed
# RDB save, too few replicas.
_REFUSES_WRITES = frozenset({"OOM", "READONLY", "MISCONF", "NOREPLICAS"})
# Error replies by which a live Redis serves nothing for a while.
_NOT_SERVING = frozenset({"LOADING", "BUSY", "MASTERDOWN"})
# Error replies by which it refuses this client's login or commands: a wrong or changed
# password, a user without the rights (the pipelined client gets these as plain replies).
_LOGIN_REFUSED = frozenset({"NOAUTH", "WRONGPASS", "NOPERM"})
# redis-py strips the code word from these replies' text; the pipelined client keeps it.
_CODE_OF_CLASS: dict[type[rexc.ResponseError], str] = {
    rexc.OutOfMemoryError: "OOM",
    rexc.ReadOnlyError: "READONLY",
    rexc.MasterDownError: "MASTERDOWN",
}


def refusal_of(exc: rexc.ResponseError) -> StoreUnavailable | None:
    """The :class:`StoreUnavailable` an error reply of a live Redis means (refusing writes, or
    not serving for a while), or None for any other reply."""
    text = str(exc)
    code = _CODE_OF_CLASS.get(type(exc))
    if code is None:
        code = text.split(" ", 1)[0]
    elif not text.startswith(code):
        text = f"{code} {text}"
    if code == "READONLY":
        return StoreReadOnly(f"store refuses writes: {text}")
    if code in _REFUSES_WRITES:
        return StoreRefusingWrites(f"store refuses writes: {text}")
    if code in _NOT_SERVING:
        return StoreUnavailable(f"store not serving: {text}")
    if code in _LOGIN_REFUSED:
        return StoreUnavailable(f"store refuses this client: {text}")
    return None


_CLIENT_REPR = re.compile(r" ?:? <redis\.asyncio\.client\.Redis\(.*?\)>\)>\)>")
BRIEF_CHARS = 300


def brief(exc: BaseException) -> str:
    """``exc`` in one short line for a log, an error answer or the ops CLI: redis-py's Sentinel
    errors name every sentinel by the repr of its whole client, a thousand characters each."""
    text = _CLIENT_REPR.sub("", " ".join(str(exc).split()))
    return text if len(text) <= BRIEF_CHARS else text[: BRIEF_CHARS - 1] + "…"
