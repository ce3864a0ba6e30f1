"""Throughput and added latency of one gateway worker, against the node direct and a ceiling.

In one run the script starts, on free loopback ports: one simulated node in instant mode
(``gateway.sim.node --tokens-per-s inf``), one throwaway redis-server (unless ``--store
embedded``), one gateway worker (hypercorn) in front of the node, and a trivial hypercorn +
Starlette app that answers ``POST /v1/chat/completions`` at once with a fixed small JSON (the
ceiling of the gateway's server stack; it is defined in scripts/bench/ceiling.py and started
as ``python scripts/bench_gateway.py --serve-trivial PORT``). It then measures, for each path:

* non-streaming requests/s at concurrency ``--concurrency`` (closed loop, ``max_tokens`` 16);
* SSE events/s relayed with 64-token streams at the same concurrency (``data:`` events
  received, ``[DONE]`` excluded, counted as they arrive);
* p50/p99 latency at concurrency 1 (sequential requests, the paths interleaved so that they
  share the noise); added latency = through the gateway minus direct.

With ``--tracing`` a second gateway worker runs beside the first with OpenTelemetry tracing on
(``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at a local OTLP/HTTP sink that accepts and counts
every export, started as ``python scripts/bench_gateway.py --serve-otlp-sink PORT``; every
request sampled, or ``--trace-ratio`` of them; the SDK's batch processor), measured the same
way on the same node; the report adds its cost against the untraced gateway of the same run
(p50/p99 added at c=1, the share of req/s and SSE events/s kept, and each gateway process's
CPU time per request under the req/s load, which other work on the machine moves less), the
median over runs. It needs the ``otel`` extra.

With ``--baseline REV`` another gateway worker runs from the files of commit REV (exported
by ``git archive`` beside the logs, run with the same Python and packages, on its own Redis
keys), measured the same way on the same node; the report adds this tree's gateway against
it in the same run (p50/p99 at c=1, req/s and SSE events/s, CPU time per request), the median
over runs: what the commits since REV cost, however fast or loaded the machine is, where the
absolute 1 ms target below moves with the machine. ``--baseline-strategy`` gives the baseline
another strategy (``--baseline HEAD --baseline-strategy round_robin``: what this tree's
``--strategy`` costs against round robin).

Every figure is the median of ``--runs`` runs. It prints a table, the three targets with
"holds" or "MISSED", any errors (status codes and sample bodies) and warnings the servers
logged, and one JSON line (``{"bench": "gateway", ...}``). Progress goes to stderr.

The gateway uses a real Redis, the production path; ``--store embedded`` measures the
embedded in-process store instead. The node gets 1024 batch slots so that it never queues.
In instant mode it writes a whole 64-token stream in one write, so "direct" SSE events/s is
about 65 times its streams/s; a relay that forwards reads as they arrive sees the same few
chunks, so the SSE figure mostly measures per-stream overhead, not per-event overhead.

The load generator is an aiohttp client in this process, so on a 2-core machine it competes
for CPU with the servers it measures (and on the direct path it is likely the bottleneck).
That is accepted: absolute figures of this machine kind differ by up to 2x between machines,
so the targets are ratios of figures measured the same way in the same run:

* gateway requests/s >= 50% of the trivial-app ceiling;
* gateway SSE events/s >= 25% of direct;
* added p50 latency at concurrency 1 <= 1 ms.

The exit status is 0 even when a target is missed (the verdict is printed), and non-zero when
something failed to start.

    python scripts/bench_gateway.py [--runs 3] [--duration 3] [--concurrency 32]
                                    [--store {redis,embedded}] [--strategy NAME]
                                    [--tracing [--trace-ratio 1.0]]
                                    [--baseline REV [--baseline-strategy NAME]]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# Run as a file, Python puts scripts/ on sys.path, not the repository root above it that holds
# the scripts package: add the root, so that scripts.bench imports from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench.ceiling import serve_trivial
from scripts.bench.harness import Processes, RedisServer, StartupError, interrupt_on_sigterm
from scripts.bench.otlp_sink import serve_otlp_sink, sink_stats
from scripts.bench.paths import BASELINE, SINK, TRACED, measure, start_paths
from scripts.bench.report import print_gateway_report


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, start the paths, measure and print the report; the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=3, help="runs; figures are medians (default 3)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per load measurement")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    p.add_argument("--concurrency", type=int, default=32, help="clients in the load tests")
    p.add_argument("--latency-requests", type=int, default=300, help="per path per run, c=1")
    p.add_argument("--store", choices=("redis", "embedded"), default="redis")
    p.add_argument("--strategy", default="min_expected_latency", help="the gateway's strategy")
    p.add_argument("--tracing", action="store_true", help="also a gateway with tracing on")
    p.add_argument(
        "--trace-ratio", type=float, default=1.0, help="--tracing: the share of traces sampled"
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also a gateway from commit REV's tree, compared with this one in the same run",
    )
    p.add_argument("--baseline-strategy", help="--baseline: its strategy (default --strategy)")
    p.add_argument("--serve-trivial", type=int, metavar="PORT", help="only serve the trivial app")
    p.add_argument("--serve-otlp-sink", type=int, metavar="PORT", help="only serve the OTLP sink")
    args = p.parse_args(argv)
    if args.serve_trivial is not None:
        return serve_trivial(args.serve_trivial)
    if args.serve_otlp_sink is not None:
        return serve_otlp_sink(args.serve_otlp_sink)
    if args.baseline_strategy and not args.baseline:
        p.error("--baseline-strategy goes with --baseline")
    args.baseline_strategy = args.baseline_strategy or args.strategy
    if not 0 < args.trace_ratio <= 1:
        p.error("--trace-ratio is a share of traces: more than 0, at most 1")
    if args.runs < 1 or args.duration <= 0 or args.concurrency < 1 or args.latency_requests < 2:
        p.error("--runs, --concurrency >= 1; --duration > 0; --latency-requests >= 2")

    interrupt_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="fleetgate-bench-"))
    procs = Processes(log_dir)
    redis: RedisServer | None = None
    try:
        try:
            redis_url: str | None = None
            if args.store == "redis":
                redis = RedisServer()
                redis.start()
                redis_url = redis.url
            bases = start_paths(args, procs, redis_url)
        except (StartupError, RuntimeError, TimeoutError, OSError) as exc:
            print(f"bench_gateway: start-up failed: {exc}", file=sys.stderr)
            return 1
        print(f"started: {bases}; logs in {log_dir}", file=sys.stderr, flush=True)
        gateways = ("gateway", TRACED, BASELINE)
        pids = {c.name: c.proc.pid for c in procs.children if c.name in gateways}
        result = asyncio.run(measure(args, bases, pids))
        if SINK in bases:
            result["exports"] = sink_stats(bases[SINK])
        dead = [c for c in procs.children if not c.alive()]
        findings = {c.name: c.findings() for c in procs.children}
        print_gateway_report(args, result, findings)
        if dead:
            for child in dead:
                print(
                    f"bench_gateway: {child.name} exited during the run "
                    f"(status {child.proc.returncode}):\n{child.tail()}",
                    file=sys.stderr,
                )
            return 1
        return 0
    except KeyboardInterrupt:
        print("bench_gateway: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.close()
        if redis is not None:
            redis.close()
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
