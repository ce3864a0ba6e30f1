"""Cache-aware routing of fleetgate: prefix hit rate, time to first token, latency and throughput
of multi-turn chats sharing long system prompts, by strategy and replica set-up.

Why: engines skip the prefill of a prompt prefix they still hold in their KV cache, so where a
chat's turn is routed decides what it costs. Behind an L4 balancer, N router replicas each see
1/N of a conversation's turns: routers that keep their cache picture to themselves (SGLang's,
vLLM's) lose it. fleetgate's replicas share one prefix index in Redis, changed by the same
atomic pick; this script measures what that is worth.

Everything runs as subprocesses on free loopback ports: a throwaway ``redis-server``, nodes,
gateway replicas (``python -m gateway``) and, where they share Redis, a health-checker.

Workload (scripts/bench/cache_workload.py): 64 conversations, each opening with one of 8 system
prompts of 1,000 words, then 4 to 6 turns, each re-sending the whole history (the previous
answers included) with a new 40-word question, answered with 32 tokens; at most 16 open at
once; every turn streamed. Open-loop Poisson arrivals at ``--load`` (0.7) of the fleet's cold
capacity (what it serves if no prefix were ever reused), exactly as many as the conversations
have turns; each turn sent to a replica drawn uniformly at random. The first
``--warmup-turns`` (32) are sent but not counted. Run r uses seed ``--seed + r`` for every
set-up; every set-up starts on emptied node caches (``POST /reset_prefix_cache``), an emptied
Redis and new gateways, and the set-ups' order rotates each run.

Parts (``--parts``, all by default):

* ``chats``: 4 simulated nodes alike (``gateway.sim.node`` with 8 slots, 50 tokens/s, a prefill
  of 4,000 tokens/s, one at a time, and a prefix cache of 256 blocks of 16 words: about four of
  the eight system prompts), registered with their cache in the gateway's blocks (256 bytes of
  canonical prompt; the words' bytes measured on the workload). ``cache_aware`` on 1 replica, 4
  replicas sharing Redis and 4 on private embedded stores; ``session_affinity``,
  ``min_expected_latency`` and ``round_robin`` on 4 sharing.
* ``unequal``: two fast nodes and two 1.5x slower in prefill and decode; ``cache_aware`` (also
  with its load bound out of reach, to see what the bound does), ``min_expected_latency`` and
  ``round_robin`` on 4 sharing replicas, with the p99 of the turns the slow and the fast nodes
  answered.
* ``engines``: the same chats, fewer (24 conversations over 8 system prompts of 800 words, 6
  open at once, answers of 16 tokens), on real llama.cpp ``llama-server``s serving the random
  ``llama-big`` model (scripts/engines.py): four of one thread, one slot and a 48 MiB prompt
  cache each, every prompt saved to it (``--slot-prompt-similarity 0``), calibrated first, at
  ``--engine-load`` (0.5) of their measured cold capacity: ``cache_aware`` on 1 replica, on
  ``--engine-replicas`` (4) sharing Redis and on as many private stores;
  ``min_expected_latency`` and ``round_robin`` on the sharing replicas; the gateways count
  the engines' caches in whole prompts (``--engine-cache-unit``, default ``prompts``: their
  ``--prefix-cache-unit``); hit rates from the engines' own ``cached_tokens`` and counters.

Figures: hit rate from the answers' ``cached_tokens`` and from the nodes' own counters
(``vllm:prefix_cache_hits_total`` / ``queries_total``; llama.cpp's names), TTFT mean, p50, p90
(to a stream's first content chunk), latency mean, p50, p90, p99, turns and tokens per second;
medians of ``--runs`` (3) runs. Targets (printed with pass or FAIL; the exit status is 0 either
way, non-zero only when something failed to start): ``cache_aware`` on 4 sharing replicas within
5% of 1 replica on hit rate and mean TTFT, and at least 2x better mean TTFT than 4 private
replicas and than ``min_expected_latency``; on unequal nodes the slow nodes' p99 within 2x of
the fast nodes'; on real engines the same as on the alike simulated nodes, and
``round_robin``'s mean TTFT at least 2x ``cache_aware``'s too.

Outputs: tables and one JSON line on stdout (progress on stderr) and, in ``--out`` (default
docs/benchmarks; nothing with ``--quick`` unless ``--out`` is given): cache.json (every run),
cache.md, and cache.png, cache_unequal.png and cache_engines.png (matplotlib: ``pip install -e
".[bench]"``). About 49 minutes on 2 cores; ``--quick`` about 1. ``--replot cache.json``
redraws the charts and cache.md.

    python scripts/bench_cache.py [--quick] [--parts chats,unequal,engines] [--runs 3]
                                  [--seed 1] [--load 0.7] [--out docs/benchmarks]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, Python puts scripts/ on sys.path, not the repository root above it that holds
# the scripts package: add the root, so that scripts.bench imports from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench.cache_main import cache_main


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with ``argv``; the exit status."""
    return cache_main(__doc__ or "", argv)


if __name__ == "__main__":
    sys.exit(main())
