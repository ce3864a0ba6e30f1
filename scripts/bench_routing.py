"""Routing quality of fleetgate: strategies, shared vs private replica state, cost by fleet
size, and failure drills, on simulated nodes of unequal capacity.

Why: N gateway replicas that keep their routing state private (LMDeploy's proxy, most
peers) each see 1/N of the load, so a load-aware strategy on each of them believes the fast
nodes are idle and they all herd onto them. fleetgate's replicas share their state in Redis.
This script measures what that is worth, and what each strategy is worth, with numbers
anyone can reproduce on one machine.

Everything runs as subprocesses on free loopback ports: a throwaway ``redis-server``,
simulated nodes (``python -m gateway.sim.node``: continuous batching with a waiting queue) of
unequal capacity, gateway replicas (``python -m gateway``) and, where they share Redis, one
health-checker (``python -m gateway.checker.health_checker``). By default there are two fast
nodes (1 slot x 320 tokens/s, 10 ms prefill) and two slow ones (1 slot x 160 tokens/s, 20 ms
prefill); ``--nodes`` changes them. Each node is registered with ``speed`` = slots x tokens/s
through ``POST /nodes/add`` (on every replica when stores are private).

Load: open loop. Arrivals are a Poisson process at ``--load`` (default 0.7) of the fleet's
capacity in requests/s, computed from the nodes' slots, tokens/s, prefill and the mean
output length, conditioned on its expected count so that every run offers exactly that load;
each request is sent at its arrival time whatever is still in flight. Output lengths
(``max_tokens``) are drawn from a seeded lognormal (median 32 tokens, sigma 0.5, capped at
128); half of the requests stream (SSE). Each request goes to a replica drawn uniformly at
random, as an L4 balancer spreads connections, and carries the ``X-Session-ID`` of one of 64
conversations (what ``session_affinity`` keys on). For the weighted strategies each node is
registered with its speed relative to the slowest node's as its weight. Run r uses seed
``--seed + r`` for every set-up, so set-ups are compared on the very same arrivals (common
random numbers). Latency is from the scheduled arrival to the last byte; time to first token
(TTFT) is to the first token event of a stream. Requests arriving in the first
``--warmup`` seconds are sent but not counted.

Parts (``--parts``, all by default):

* ``compare``: every strategy with 4 replicas sharing Redis; ``min_expected_latency`` and
  ``min_observed_latency`` also with 1 replica (on Redis) and with 4 replicas each on its own
  embedded store (the LMDeploy situation). Mean, p50, p90, p99 latency, TTFT p50/p99,
  errors and each node's share of the answers, medians of ``--runs`` runs.
* ``scale``: one replica on Redis with 4, 16, 64 and 256 registered nodes (one instant
  simulated node listening on 256 loopback ports, so every node id is a distinct URL) at a
  fixed ``--scale-rate``: gateway CPU per request (``/proc/<pid>/stat``), Redis CPU per
  request (``INFO cpu``), script calls per request and server time per call (``INFO
  commandstats``).
* ``drills``: (1) kill -9 a fast node mid-run, with 4 shared replicas and the health-checker
  (``--interval 0.5 --fall 2 --timeout 0.5``), then again with 4 private replicas (no
  checker possible: only passive ejection): failed requests, when each replica last tried
  the dead node (from each replica's ``fleetgate_upstream_attempts_total``), and the
  latencies and errors of the rest. The drills run at ``--drill-load`` (default 0.5) of the
  full fleet, so that the survivors can carry it. (2) kill -9 one of 4 shared replicas
  running with ``--lease-seconds 3`` while it has requests in flight (the L4 balancer stops
  sending to it at once): the requests cut, how long its leases stayed in Redis, when
  ``/nodes/replicas`` dropped it, and that ``/nodes/status`` came back to ``unfinished`` 0.

Targets (printed with "holds" or "MISSED"; the exit status is 0 either way, non-zero only
when something failed to start): at 70% load, 4 sharing replicas within 5% of 1 replica's
mean latency and at least 10% better than 4 private replicas, for both latency strategies;
``min_expected_latency`` better than ``random`` and ``round_robin``; per-request gateway and
Redis CPU at 256 nodes at most 1.25x that at 64 (flat past the 32-candidate full-scan limit).
Two set-ups are compared run by run, on the same arrivals: the figure is the median of the
per-run ratios of their mean latencies (the table shows the medians of each set-up's runs).

``--engines llama`` runs another scenario instead, on real engines (scripts/bench/engine_*.py):
llama.cpp ``llama-server``s with the ``llama-big`` random model (built once into the engines
cache by scripts/engines.py), each on its own CPU thread with a bounded prompt cache, whose
prefill time depends on what that cache holds; multi-turn chats sharing long system prompts
(scripts/bench/chats.py), every turn streamed, a conversation's turns spread over the
replicas, at ``--load`` (default 0.8) of the fleet's cold capacity measured first; every strategy on
``--engine-replicas`` (4) replicas sharing Redis with a health-checker, and ``cache_aware``
also on one; mean/p50/p90/p99 latency, TTFT, errors, node shares and the prefix hit rate the
engines themselves report, medians of ``--runs`` runs of ``--engine-requests`` turns, with
ratios to ``round_robin`` in the same run. It writes ``engines.json``, ``engines.md`` and
``engines.png`` (15 to 25 minutes on 2 cores: the rate, and so the time, follows the
calibration; ``--quick``, one run of two set-ups, about 1).

Outputs: a table and one JSON line on stdout (progress on stderr) and, in ``--out``
(default ``docs/benchmarks``; nothing is written with ``--quick`` unless ``--out`` is
given): ``results.json`` (every run), ``results.md`` (the figures, the command, the date),
and the charts ``latency.png``, ``shares.png``, ``scale.png`` and ``drill.png`` (needs
matplotlib: ``pip install -e ".[bench]"``). The default set takes about 8 minutes on
2 cores; ``--quick`` is a smoke run of about 2 minutes. ``--replot results.json`` redraws
the charts and results.md from saved figures.

    python scripts/bench_routing.py [--quick] [--runs 3] [--seed 1] [--duration 8]
                                    [--load 0.7] [--out docs/benchmarks]
    python scripts/bench_routing.py --engines llama [--quick] [--runs 3] [--load 0.8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# Run as a file, Python puts scripts/ on sys.path, not the repository root above it that holds
# the scripts package: add the root, so that scripts.bench imports from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.exceptions import RedisError

from scripts.bench.engine_cli import add_engine_arguments, engine_main, replot_engines
from scripts.bench.harness import (
    ROOT,
    Interrupted,
    StartupError,
    interrupt_on_sigterm,
    progress,
)
from scripts.bench.report import print_routing_report, routing_summary_line
from scripts.bench.routing import measure, replot, write_files
from scripts.bench.scale import serve_instant_nodes
from scripts.bench.scenario import DEFAULT_NODES, parse_nodes


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, measure, print the report and write the files; the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="a small smoke set (about 2 minutes)")
    p.add_argument("--runs", type=int, help="runs per set-up; figures are medians (default 3)")
    p.add_argument("--seed", type=int, default=1, help="run r uses seed + r (default 1)")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 8)")
    p.add_argument("--warmup", type=float, help="seconds of load before measuring (default 1)")
    p.add_argument(
        "--load",
        type=float,
        help="fraction of capacity (default 0.7; engines: 0.8 of the cold one)",
    )
    p.add_argument("--out", type=Path, help="where to write (default docs/benchmarks)")
    p.add_argument(
        "--parts", default="compare,scale,drills", help="comma list of compare,scale,drills"
    )
    p.add_argument(
        "--only", help="comma list: compare only set-ups whose key (strategy/set-up) has one"
    )
    p.add_argument(
        "--nodes",
        type=parse_nodes,
        default=DEFAULT_NODES,
        help="name:slots:tokens_per_s:prefill_ms,... (default: "
        + ",".join(f"{n.name}:{n.slots}:{n.tokens_per_s:g}:{n.prefill_ms:g}" for n in DEFAULT_NODES)
        + ")",
    )
    p.add_argument("--median-tokens", type=float, default=32.0, help="output length median")
    p.add_argument("--sigma", type=float, default=0.5, help="output length lognormal sigma")
    p.add_argument("--max-tokens", type=int, default=128, help="output length cap")
    p.add_argument(
        "--stream-fraction", type=float, help="share of SSE requests (default 0.5; engines: 1)"
    )
    p.add_argument("--scale-rate", type=float, default=100.0, help="req/s in the scale part")
    p.add_argument("--scale-duration", type=float, help="seconds per scale run (default 4)")
    p.add_argument("--drill-load", type=float, default=0.5, help="fraction of capacity")
    p.add_argument("--drill-duration", type=float, help="seconds per drill (default 12)")
    p.add_argument("--drill-lease", type=float, default=3.0, help="--lease-seconds, replica drill")
    p.add_argument("--drill-victim", default="fast-2", help="node killed in the node drill")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: redraw the charts and results.md of a results.json into --out",
    )
    p.add_argument("--serve-instant-nodes", type=int, metavar="N", help=argparse.SUPPRESS)
    add_engine_arguments(p)
    args = p.parse_args(argv)
    if args.serve_instant_nodes is not None:
        return serve_instant_nodes(args.serve_instant_nodes)
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        if saved.get("bench") == "routing-engines":
            replot_engines(saved, args.out or args.replot.parent)
        else:
            replot(args.replot, args.out or args.replot.parent)
        return 0
    quick = args.quick
    args.only = [x.strip() for x in (args.only or "").split(",") if x.strip()]
    if args.engines:
        if args.duration is not None or args.warmup is not None:
            p.error("--engines runs are counted in turns: --engine-requests, --engine-warmup")
        if (args.runs is not None and args.runs < 1) or args.engine_replicas < 1:
            p.error("--runs >= 1, --engine-replicas >= 1")
        if args.engine_rate is not None and args.engine_rate <= 0:
            p.error("--engine-rate > 0")
        if args.load is not None and not 0 < args.load < 1.5:
            p.error("0 < --load < 1.5")
        return engine_main(args, args.out if args.out or quick else ROOT / "docs" / "benchmarks")
    for name, full, small in (
        ("runs", 3, 1),
        ("duration", 8.0, 4.0),
        ("warmup", 1.0, 0.5),
        ("scale_duration", 4.0, 2.0),
        ("drill_duration", 12.0, 8.0),
        ("load", 0.7, 0.7),
        ("stream_fraction", 0.5, 0.5),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not set(args.parts) <= {"compare", "scale", "drills"} or not args.parts:
        p.error("--parts is a comma list of compare, scale, drills")
    if args.runs < 1 or args.duration <= 0 or not 0 < args.load < 1.5:
        p.error("--runs >= 1, --duration > 0, 0 < --load < 1.5")
    if args.drill_victim not in {n.name for n in args.nodes}:
        p.error(f"--drill-victim is one of {', '.join(n.name for n in args.nodes)}")
    out: Path | None = args.out
    if out is None and not quick:
        out = ROOT / "docs" / "benchmarks"

    interrupt_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="fleetgate-bench-routing-"))
    try:
        try:
            result = asyncio.run(measure(args, log_dir))
        except (StartupError, RuntimeError, TimeoutError, OSError, RedisError) as exc:
            print(f"bench_routing: failed: {exc}", file=sys.stderr)
            return 1
        print_routing_report(result)
        if out is not None:
            written = write_files(result, out)
            progress(f"wrote {', '.join(written)} to {out}")
        print(f"elapsed: {result['elapsed_s']:.0f} s")
        print(json.dumps(routing_summary_line(result)))
        return 0
    except (KeyboardInterrupt, Interrupted, asyncio.CancelledError):
        print("bench_routing: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
