"""Cost of the request path's metric updates: fleetgate's hand-written registry against
``prometheus_client``, in one process and in its multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
what ``--workers N`` would need); and the cost of one scrape of a two-worker replica.

A request updates five metrics on its way (gateway/replica: ``admissions``, ``ttfb``,
``attempts``, ``requests``, ``latency``: three counters and two histograms, labelled by node,
model, status or result); the script repeats those five updates ``--requests`` times over three
nodes, ``--runs`` times, each variant in a fresh interpreter, and prints the median µs of wall
and CPU time per request. The budget they share: the gateway adds about 250 µs of CPU and
0.5 ms p50 per request in all.

The scrape: fleetgate's own (two workers' snapshots encoded, decoded, merged and rendered, as
gateway/replica/worker_metrics.py does, the Unix socket round trip left out) against
``prometheus_client``'s ``MultiProcessCollector`` reading two processes' files. Prints a table
and one JSON line (``{"bench": "metrics", ...}``).

    pip install -e ".[bench]" && python scripts/bench_metrics.py [--runs 5] [--requests 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.common.metrics import LATENCY_BUCKETS_S, merge, render_families
from gateway.replica.metrics import GatewayMetrics
from gateway.replica.worker_metrics import decode_snapshot, encode_snapshot

NODES = [f"http://10.0.0.{i}:23333" for i in range(1, 4)]
MODEL = "llama-3-8b"
VARIANTS = {
    "fleetgate": "hand-written registry (dict increments)",
    "prometheus_client": "prometheus_client, one process",
    "prometheus_client multiprocess": "prometheus_client, PROMETHEUS_MULTIPROC_DIR (mmap files)",
}


def fleetgate_updates(metrics: GatewayMetrics) -> Callable[[int], None]:

    def one(i: int) -> None:
        node = NODES[i % 3]
        metrics.admissions.inc((("how", "direct"),))
        metrics.ttfb.observe((("model", MODEL),), 0.003)
        metrics.attempts.inc((("node", node), ("result", "200")))
        metrics.requests.inc((("node", node), ("model", MODEL), ("status", "200")))
        metrics.latency.observe((("model", MODEL),), 0.004)

    return one


def prometheus_updates() -> Callable[[int], None]:
    import prometheus_client as prom

    registry = prom.CollectorRegistry()
    requests = prom.Counter(
        "fleetgate_requests", "", ["node", "model", "status"], registry=registry
    )
    attempts = prom.Counter(
        "fleetgate_upstream_attempts", "", ["node", "result"], registry=registry
    )
    admissions = prom.Counter("fleetgate_admissions", "", ["how"], registry=registry)
    latency = prom.Histogram(
        "fleetgate_request_duration_seconds",
        "",
        ["model"],
        buckets=LATENCY_BUCKETS_S,
        registry=registry,
    )
    ttfb = prom.Histogram(
        "fleetgate_time_to_first_byte_seconds",
        "",
        ["model"],
        buckets=LATENCY_BUCKETS_S,
        registry=registry,
    )

    def one(i: int) -> None:
        node = NODES[i % 3]
        admissions.labels(how="direct").inc()
        ttfb.labels(model=MODEL).observe(0.003)
        attempts.labels(node=node, result="200").inc()
        requests.labels(node=node, model=MODEL, status="200").inc()
        latency.labels(model=MODEL).observe(0.004)

    return one


def measure_updates(variant: str, requests: int, runs: int) -> dict[str, float]:
    """In this interpreter: µs of wall and CPU time per request, medians over ``runs``."""
    one = fleetgate_updates(GatewayMetrics()) if variant == "fleetgate" else prometheus_updates()
    for i in range(1000):  # every series exists before timing
        one(i)
    walls, cpus = [], []
    for _ in range(runs):
        cpu0, wall0 = time.process_time_ns(), time.perf_counter_ns()
        for i in range(requests):
            one(i)
        cpus.append((time.process_time_ns() - cpu0) / requests / 1000)
        walls.append((time.perf_counter_ns() - wall0) / requests / 1000)
    return {"wall_us": statistics.median(walls), "cpu_us": statistics.median(cpus)}


def fleetgate_scrape_ms(runs: int) -> float:
    """Two workers' snapshots (after 1,000 requests each) summed and rendered, ms."""
    metrics = GatewayMetrics()
    one = fleetgate_updates(metrics)
    for i in range(1000):
        one(i)
    times = []
    for _ in range(runs * 20):
        started = time.perf_counter_ns()
        own = metrics.snapshot()
        peer = decode_snapshot(encode_snapshot(metrics.snapshot()))
        render_families(merge([own, peer]))
        times.append((time.perf_counter_ns() - started) / 1e6)
    return statistics.median(times)


def prometheus_scrape_ms(folder: str, runs: int) -> float:
    """``MultiProcessCollector`` over ``folder`` (two processes' files), ms."""
    import prometheus_client as prom
    from prometheus_client import multiprocess

    registry = prom.CollectorRegistry()
    collector: Any = multiprocess.MultiProcessCollector  # untyped in prometheus_client
    collector(registry, path=folder)
    times = []
    for _ in range(runs * 20):
        started = time.perf_counter_ns()
        prom.generate_latest(registry)
        times.append((time.perf_counter_ns() - started) / 1e6)
    return statistics.median(times)


def child(variant: str, requests: int, runs: int, folder: str) -> dict[str, float]:
    """Run ``--variant`` in a fresh interpreter (multiprocess mode is chosen at import)."""
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if variant.endswith("multiprocess"):
        env["PROMETHEUS_MULTIPROC_DIR"] = folder
    done = subprocess.run(
        [sys.executable, __file__, "--variant", variant, *_counts(requests, runs)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    found: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return found


def _counts(requests: int, runs: int) -> list[str]:
    return ["--requests", str(requests), "--runs", str(runs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure_updates(args.variant, args.requests, args.runs)))
        return 0
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as folder:
        for variant in VARIANTS:
            print(f"measuring {variant} ...", file=sys.stderr)
            results[variant] = child(variant, args.requests, args.runs, folder)
        # A second process's files, as a second worker would leave them.
        child("prometheus_client multiprocess", 1000, 1, folder)
        scrape_ms = {
            "fleetgate": fleetgate_scrape_ms(args.runs),
            "prometheus_client multiprocess": prometheus_scrape_ms(folder, args.runs),
        }
    base = results["fleetgate"]["cpu_us"]
    print(
        f"metric updates of one request (5: 3 counters, 2 histograms), {args.requests:,} "
        f"requests, median of {args.runs} runs"
    )
    print(f"{'variant':<34} {'wall µs':>8} {'CPU µs':>8} {'x':>6} {'of 250 µs':>10}")
    for variant, found in results.items():
        share = found["cpu_us"] / 250 * 100
        print(
            f"{variant:<34} {found['wall_us']:>8.2f} {found['cpu_us']:>8.2f} "
            f"{found['cpu_us'] / base:>6.1f} {share:>9.1f}%"
        )
    print("one scrape of two workers (after 1,000 requests each):")
    for variant, ms in scrape_ms.items():
        print(f"  {variant:<32} {ms:.2f} ms")
    print(json.dumps({"bench": "metrics", "per_request": results, "scrape_ms": scrape_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
