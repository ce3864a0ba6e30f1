"""Helpers shared by the tests."""

from scripts.bench.harness import RedisServer, free_port, wait_for_port

__all__ = ["RedisServer", "free_port", "wait_for_port"]
