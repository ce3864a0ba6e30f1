"""Errors raised by the shared state, each knowing its HTTP status and OpenAI error type."""

from __future__ import annotations


class StateError(Exception):
    """Base of every shared-state error."""

    status_code = 500
    error_type = "server_error"
    code = "state_error"


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
    """The store did not answer in time or refused the connection."""

    status_code = 503
    error_type = "service_unavailable"
    code = "store_unavailable"


class Fenced(StateError):
    """A write by a health-checker that no longer holds the leader lease; nothing changed."""

    status_code = 409
    error_type = "conflict"
    code = "fenced"
