"""Watch a server start from a process of its own: ``python -m tests.support.health_watch URL
SECONDS`` asks ``URL/health`` every 0.2 s and prints each answer the first time it sees it
(a status code, ``refused`` while nothing listens, or the error's name), until a 200 (exit 0)
or ``SECONDS`` have passed (exit 1).

A process of its own because it runs while the unit tests do, which may not touch the network
from the test process (tests/unit/conftest.py)."""

from __future__ import annotations

import sys
import time

import httpx


def answer(url: str) -> str:
    try:
        return str(httpx.get(f"{url}/health", timeout=5).status_code)
    except httpx.ConnectError:
        return "refused"
    except httpx.HTTPError as exc:
        return type(exc).__name__


def main(argv: list[str]) -> int:
    url, seconds = argv[0], float(argv[1])
    deadline = time.monotonic() + seconds
    seen: set[str] = set()
    while (found := answer(url)) != "200":
        if found not in seen:
            seen.add(found)
            print(found, flush=True)
        if time.monotonic() > deadline:
            return 1
        time.sleep(0.2)
    print("200", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
