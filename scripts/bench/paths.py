"""The gateway benchmark's three paths to an instant simulated node: direct, through one
gateway worker, and the trivial ceiling app (with ``--tracing``, a fourth: a second gateway
worker with OpenTelemetry tracing on, exporting to a local OTLP sink); starting them, and
measuring each."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scripts.bench.figures import p50_p99
from scripts.bench.harness import (
    ROOT,
    START_TIMEOUT_S,
    Child,
    Processes,
    StartupError,
    free_port,
    proc_cpu_s,
    progress,
)
from scripts.bench.load import (
    CHAT_PATH,
    HEADERS,
    MODEL,
    PLAIN_BODY,
    TALLY_SAMPLES,
    Tally,
    client_session,
    closed_loop,
    sequential_latency,
)

PATHS = ("direct", "gateway", "trivial")
TRACED = "traced"  # the gateway with tracing on (--tracing)
SINK = "otlp-sink"  # where the traced gateway exports its spans
BASELINE = "baseline"  # the gateway of another commit's tree (--baseline REV)
LABELS = {
    "direct": "direct",
    "gateway": "gateway",
    TRACED: "gateway, traced",
    BASELINE: "gateway, base",
    "trivial": "trivial ceiling",
}


def paths_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The paths this run measures, in the order of its loads: the traced gateway and the
    baseline's right after this tree's, so that what else runs on the machine moves them
    alike."""
    extra = (TRACED,) * bool(args.tracing) + (BASELINE,) * bool(args.baseline)
    return ("direct", "gateway", *extra, "trivial")


def _http(url: str, body: bytes | None = None, timeout_s: float = 2.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=HEADERS if body else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_model_listed(child: Child, base: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until the gateway lists the model (it registered the node)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartupError(f"{child.name} exited:\n{child.tail()}")
        try:
            status, body = _http(base + "/v1/models")
            ids = [m.get("id") for m in json.loads(body).get("data", [])] if status == 200 else []
            if MODEL in ids:
                return
            last = f"{status} {body[:200]!r}"
        except (OSError, ValueError, AttributeError) as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise StartupError(f"gateway never listed {MODEL} (last: {last}):\n{child.tail()}")


def check_answers(base: str, name: str) -> None:
    """One plain request through ``base``: it must answer 200 with JSON choices."""
    try:
        status, body = _http(base + CHAT_PATH, PLAIN_BODY, timeout_s=10.0)
    except OSError as exc:
        raise StartupError(f"{name}: first request failed: {exc!r}") from None
    if status != 200 or b'"choices"' not in body:
        raise StartupError(f"{name}: first request answered {status}: {body[:500]!r}")


def gateway_argv(
    port: int, node_url: str, strategy: str, redis_url: str | None, prefix: str | None
) -> list[str]:
    """A gateway worker in front of the node; on Redis under its own ``prefix`` of keys when
    given (gateways measured side by side share no state)."""
    argv = [sys.executable, "-m", "gateway", "--port", str(port), "--node", node_url]
    argv += ["--strategy", strategy]
    if redis_url is not None:
        argv += ["--redis-url", redis_url]
        if prefix is not None:
            argv += ["--prefix", prefix]
    return argv


def start_paths(
    args: argparse.Namespace, procs: Processes, redis_url: str | None
) -> dict[str, str]:
    """Start node, gateway and trivial app; return each path's base URL once it answers."""
    py = sys.executable
    node_port, gateway_port, trivial_port = free_port(), free_port(), free_port()
    node_argv = [py, "-m", "gateway.sim.node", "--port", str(node_port), "--tokens-per-s", "inf"]
    # Enough batch slots that the instant node never queues: the baseline must not wait.
    node = procs.start("node", [*node_argv, "--model", MODEL, "--slots", "1024"], node_port)
    here = str(ROOT / "scripts" / "bench_gateway.py")
    trivial_argv = [py, here, "--serve-trivial", str(trivial_port)]
    trivial = procs.start("trivial", trivial_argv, trivial_port)
    procs.wait_port(node)
    argv = gateway_argv(gateway_port, node.url, args.strategy, redis_url, prefix=None)
    gateway = procs.start("gateway", argv, gateway_port)
    procs.wait_port(gateway)
    wait_model_listed(gateway, gateway.url)
    procs.wait_port(trivial)
    bases = {"direct": node.url, "gateway": gateway.url, "trivial": trivial.url}
    if args.tracing:
        bases[SINK], bases[TRACED] = start_traced(args, procs, node.url, redis_url)
    if args.baseline:
        bases[BASELINE] = start_baseline(args, procs, node.url, redis_url)
    for name in paths_of(args):
        check_answers(bases[name], name)
    return bases


def start_traced(
    args: argparse.Namespace, procs: Processes, node_url: str, redis_url: str | None
) -> tuple[str, str]:
    """An OTLP sink and a second gateway worker tracing requests to it (the SDK's defaults:
    the batch processor, OTLP/HTTP protobuf; every trace sampled, or ``--trace-ratio`` of
    them); their URLs."""
    py = sys.executable
    sink_port, port = free_port(), free_port()
    here = str(ROOT / "scripts" / "bench_gateway.py")
    sink = procs.start("otlp-sink", [py, here, "--serve-otlp-sink", str(sink_port)], sink_port)
    procs.wait_port(sink)
    argv = gateway_argv(port, node_url, args.strategy, redis_url, prefix="fleetgate-traced")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url, "OTEL_SERVICE_NAME": "fleetgate-bench"}
    if args.trace_ratio < 1:
        env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        env["OTEL_TRACES_SAMPLER_ARG"] = f"{args.trace_ratio:g}"
    traced = procs.start(TRACED, argv, port, env)
    procs.wait_port(traced)
    wait_model_listed(traced, traced.url)
    return sink.url, traced.url


def export_tree(revision: str, into: Path) -> Path:
    """The files of commit ``revision`` of this repository, written under ``into`` (``git
    archive``: no checkout touched); StartupError with git's words if it names no commit."""
    tree = into / "baseline-tree"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise StartupError(f"--baseline {revision}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def start_baseline(
    args: argparse.Namespace, procs: Processes, node_url: str, redis_url: str | None
) -> str:
    """A second gateway worker run from the tree of commit ``--baseline`` (exported beside
    the logs; the same Python and installed packages), on its own Redis keys, with
    ``--baseline-strategy``; its URL. This tree's gateway is compared with it in the
    same run: what a change (or a strategy) costs, whatever the machine's speed."""
    tree = export_tree(args.baseline, procs.log_dir)
    port = free_port()
    argv = gateway_argv(port, node_url, args.baseline_strategy, redis_url, "fleetgate-baseline")
    # ``python -m`` puts the working folder first on sys.path: the exported tree's packages.
    baseline = procs.start(BASELINE, argv, port, cwd=tree)
    procs.wait_port(baseline)
    wait_model_listed(baseline, baseline.url)
    return baseline.url


async def measure(
    args: argparse.Namespace, bases: dict[str, str], pids: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """``--runs`` runs of every load on every path: the runs' figures (``path.figure``),
    their medians, and the errors seen on each path. A path served by a process of ``pids``
    also gets ``path.cpu_us``: that process's CPU time per request of its req/s load."""
    pids = pids or {}
    paths = paths_of(args)
    urls = {name: bases[name] + CHAT_PATH for name in paths}
    runs: list[dict[str, float]] = []
    errors: dict[str, Tally] = {name: Tally() for name in paths}

    def merge(name: str, tally: Tally) -> None:
        errors[name].errors.update(tally.errors)
        room = TALLY_SAMPLES - len(errors[name].samples)
        errors[name].samples.extend(tally.samples[: max(room, 0)])

    async with client_session(60.0) as session:
        for run in range(1, args.runs + 1):
            figures: dict[str, float] = {}
            loads = [(name, False, "rps") for name in paths]
            loads += [(name, True, "sse") for name in paths if name != "trivial"]
            for name, stream, figure in loads:
                cpu_s = proc_cpu_s(pids[name]) if name in pids else 0.0
                rate, tally = await closed_loop(
                    session,
                    urls[name],
                    stream=stream,
                    concurrency=args.concurrency,
                    warmup_s=args.warmup,
                    duration_s=args.duration,
                )
                figures[f"{name}.{figure}"] = rate
                if name in pids and not stream and tally.ok:
                    cpu_s = proc_cpu_s(pids[name]) - cpu_s
                    figures[f"{name}.cpu_us"] = cpu_s / tally.ok * 1e6
                merge(name, tally)
            samples, tallies = await sequential_latency(session, urls, args.latency_requests)
            for name in paths:
                figures[f"{name}.p50"], figures[f"{name}.p99"] = p50_p99(samples[name])
                merge(name, tallies[name])
            runs.append(figures)
            shown = ", ".join(
                f"{k} {v:.3f}" if k.endswith(("p50", "p99")) else f"{k} {v:,.0f}"
                for k, v in figures.items()
            )
            progress(f"run {run}/{args.runs}: {shown}")
    medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return {"medians": medians, "runs": runs, "errors": errors}
