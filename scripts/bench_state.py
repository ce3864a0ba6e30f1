"""Cost of pick-and-reserve + release against a real redis-server, by fleet size.

Starts its own redis-server on a free loopback port, registers N nodes, and measures for
N = 4, 16, 64, 256: pick+release pairs per second at a set concurrency, microseconds per
script call seen by the client one at a time, and the server's own microseconds per call
(INFO commandstats). Prints a table and one JSON line; medians over ``--runs`` runs.

With ``--strategy cache_aware`` it measures the cache_aware pick instead, by fleet size and
prompt length (1k, 8k, 32k, 128k tokens): microseconds per pick seen by the client and by the
server, pick+release pairs/s, and the replica's own cost of hashing the prompt
(scripts/bench/prefix_cost.py); ``--pairs`` defaults to 400 there; ``--prefix-cache-unit
prompts`` measures the index counting whole prompts (llama-server's caches).

    python scripts/bench_state.py [--runs 5] [--pairs 2000] [--concurrency 32]
    python scripts/bench_state.py --strategy cache_aware [--runs 3] [--prefix-cache-unit prompts]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

# Run as a file, Python puts scripts/ on sys.path, not the repository root above it that holds
# the scripts package: add the root, so that scripts.bench imports from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench import prefix_cost
from scripts.bench.pick_cost import measure
from scripts.bench.report import print_state_report
from shared_state import Strategy
from shared_state.prefix import CACHE_UNITS


def main(argv: list[str] | None = None) -> int:
    """Parse the options, measure and print the report; 0 when the target holds, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pairs", type=int, help="default 2000 (cache_aware: 400)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--strategy", type=Strategy, default=Strategy.MIN_EXPECTED_LATENCY)
    parser.add_argument(
        "--prefix-cache-unit",
        choices=CACHE_UNITS,
        default="blocks",
        help="cache_aware: the index counting blocks or whole prompts (the gateway's option)",
    )
    args = parser.parse_args(argv)
    if args.strategy is Strategy.CACHE_AWARE:
        pairs = args.pairs or 400
        whole = args.prefix_cache_unit == "prompts"
        found = asyncio.run(prefix_cost.measure(args.runs, pairs, args.concurrency, whole))
        prefix_cost.print_report(args.runs, args.concurrency, found, args.prefix_cache_unit)
        return 0
    args.pairs = args.pairs or 2000
    results = asyncio.run(measure(args.strategy, args.runs, args.pairs, args.concurrency))
    holds = print_state_report(args.strategy.value, args.runs, args.concurrency, results)
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
