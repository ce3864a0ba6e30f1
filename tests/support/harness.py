"""The benchmark harness's throwaway redis-server and loopback port helpers, used by tests."""

from scripts.bench.harness import RedisServer, free_port, wait_for_port

__all__ = ["RedisServer", "free_port", "wait_for_port"]
