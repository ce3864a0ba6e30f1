"""The gateway benchmark's three paths to an instant simulated node: direct, through one
gateway worker, and the trivial ceiling app; starting them, and measuring each."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from scripts.bench.figures import p50_p99
from scripts.bench.harness import (
    ROOT,
    START_TIMEOUT_S,
    Child,
    Processes,
    StartupError,
    free_port,
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
LABELS = {"direct": "direct", "gateway": "gateway", "trivial": "trivial ceiling"}


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
    argv = [py, "-m", "gateway", "--port", str(gateway_port), "--node", node.url]
    argv += ["--strategy", args.strategy]
    if redis_url is not None:
        argv += ["--redis-url", redis_url]
    gateway = procs.start("gateway", argv, gateway_port)
    procs.wait_port(gateway)
    wait_model_listed(gateway, gateway.url)
    procs.wait_port(trivial)
    bases = {"direct": node.url, "gateway": gateway.url, "trivial": trivial.url}
    for name, base in bases.items():
        check_answers(base, name)
    return bases


async def measure(args: argparse.Namespace, bases: dict[str, str]) -> dict[str, Any]:
    """``--runs`` runs of every load on every path: the runs' figures (``path.figure``),
    their medians, and the errors seen on each path."""
    urls = {name: base + CHAT_PATH for name, base in bases.items()}
    runs: list[dict[str, float]] = []
    errors: dict[str, Tally] = {name: Tally() for name in PATHS}

    def merge(name: str, tally: Tally) -> None:
        errors[name].errors.update(tally.errors)
        room = TALLY_SAMPLES - len(errors[name].samples)
        errors[name].samples.extend(tally.samples[: max(room, 0)])

    async with client_session(60.0) as session:
        for run in range(1, args.runs + 1):
            figures: dict[str, float] = {}
            loads = [(name, False, "rps") for name in PATHS]
            loads += [(name, True, "sse") for name in ("direct", "gateway")]
            for name, stream, figure in loads:
                rate, tally = await closed_loop(
                    session,
                    urls[name],
                    stream=stream,
                    concurrency=args.concurrency,
                    warmup_s=args.warmup,
                    duration_s=args.duration,
                )
                figures[f"{name}.{figure}"] = rate
                merge(name, tally)
            samples, tallies = await sequential_latency(session, urls, args.latency_requests)
            for name in PATHS:
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
