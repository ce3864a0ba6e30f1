"""Helpers shared by the tests."""

from shared_state.devserver import RedisServer, free_port, wait_for_port

__all__ = ["RedisServer", "free_port", "wait_for_port"]
