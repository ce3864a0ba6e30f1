"""Throughput and added latency of one gateway worker, against the node direct and a ceiling.

In one run the script starts, on free loopback ports: one simulated node in instant mode
(``gateway.sim.node --tokens-per-s inf``), one throwaway redis-server (unless ``--store
embedded``), one gateway worker (hypercorn) in front of the node, and a trivial hypercorn +
Starlette app that answers ``POST /v1/chat/completions`` at once with a fixed small JSON (the
ceiling of the gateway's server stack; it is defined in this file and started as
``python scripts/bench_gateway.py --serve-trivial PORT``). It then measures, for each path:

* non-streaming requests/s at concurrency ``--concurrency`` (closed loop, ``max_tokens`` 16);
* SSE events/s relayed with 64-token streams at the same concurrency (``data:`` events
  received, ``[DONE]`` excluded, counted as they arrive);
* p50/p99 latency at concurrency 1 (sequential requests, the paths interleaved so that they
  share the noise); added latency = through the gateway minus direct.

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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
_MESSAGES = [{"role": "user", "content": "Say hello to the benchmark."}]
PLAIN_BODY = json.dumps({"model": MODEL, "messages": _MESSAGES, "max_tokens": 16}).encode()
STREAM_BODY = json.dumps(
    {"model": MODEL, "messages": _MESSAGES, "max_tokens": 64, "stream": True}
).encode()
STREAM_EVENTS = 64 + 1  # one per token and the last one with finish_reason
HEADERS = {"Content-Type": "application/json"}
ERROR_SAMPLES = 5
START_TIMEOUT_S = 20.0

# -- the trivial app: hypercorn + Starlette answering at once ---------------------------------

TRIVIAL_ANSWER = json.dumps(
    {
        "id": "chatcmpl-trivial",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "logprobs": None,
                "finish_reason": "length",
                "message": {
                    "role": "assistant",
                    "content": "".join(f"tok{i} " for i in range(16)),
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21},
    }
).encode()


async def _trivial_chat(request: Request) -> Response:
    await request.body()
    return Response(TRIVIAL_ANSWER, media_type="application/json")


trivial_app = Starlette(routes=[Route(CHAT_PATH, _trivial_chat, methods=["POST"])])


def serve_trivial(port: int) -> int:
    """Serve :data:`trivial_app` with hypercorn on 127.0.0.1:``port`` until SIGINT/SIGTERM."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75.0  # as the gateway's

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"trivial app listening on http://127.0.0.1:{port}", flush=True)
        await serve(trivial_app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    from gateway.replica.server import loop_factory

    # The same event loop as the gateway's, so the ceiling is that of the same server stack.
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory()) as r:
        r.run(main())
    return 0


# -- processes -----------------------------------------------------------------------------


class StartupError(Exception):
    """Something the benchmark needs did not start."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Subprocesses of this run, each logging to a file; all stopped by :meth:`close`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self._files: list[IO[bytes]] = []

    def start(self, name: str, argv: Sequence[str]) -> Child:
        log = self.log_dir / f"{name}.log"
        out = log.open("wb")
        self._files.append(out)
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def wait_port(self, child: Child, port: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise StartupError(
                    f"{child.name} exited with status {child.proc.returncode}:\n{child.tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise StartupError(f"{child.name} does not listen on port {port}:\n{child.tail()}")

    def close(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(timeout=10)
        for f in self._files:
            f.close()


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
        if child.proc.poll() is not None:
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


# -- load ----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a load phase saw; errors by kind, with a few sample bodies."""

    ok: int = 0
    events: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.samples) < ERROR_SAMPLES:
            self.samples.append(f"{kind}: {detail[:300]}")


async def _plain(session: aiohttp.ClientSession, url: str, tally: Tally) -> bool:
    async with session.post(url, data=PLAIN_BODY, headers=HEADERS) as response:
        body = await response.read()
        if response.status != 200:
            tally.error(f"HTTP {response.status}", body.decode("utf-8", "replace"))
            return False
    tally.ok += 1
    return True


async def _stream(session: aiohttp.ClientSession, url: str, tally: Tally) -> bool:
    async with session.post(url, data=STREAM_BODY, headers=HEADERS) as response:
        if response.status != 200:
            body = await response.read()
            tally.error(f"HTTP {response.status}", body.decode("utf-8", "replace"))
            return False
        tail = b""
        done = False
        total = 0
        async for chunk in response.content.iter_any():
            parts = (tail + chunk).split(b"\n\n")
            tail = parts.pop()
            n = 0
            for part in parts:
                if part.startswith(b"data:"):
                    if part == b"data: [DONE]":
                        done = True
                    elif part.startswith(b'data: {"error"'):
                        tally.error("SSE error event", part.decode("utf-8", "replace"))
                    else:
                        n += 1
            tally.events += n
            total += n
    if not done:
        tally.error("stream without [DONE]", f"{total} events, tail {tail[:200]!r}")
        return False
    if total != STREAM_EVENTS:
        tally.error("stream of the wrong length", f"{total} events, expected {STREAM_EVENTS}")
        return False
    tally.ok += 1
    return True


async def _request(session: aiohttp.ClientSession, url: str, stream: bool, tally: Tally) -> bool:
    try:
        if stream:
            return await _stream(session, url, tally)
        return await _plain(session, url, tally)
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.error(type(exc).__name__, str(exc))
        return False


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    *,
    stream: bool,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> tuple[float, Tally]:
    """Requests (or SSE events) per second over ``duration_s`` after ``warmup_s`` of load."""
    tally = Tally()
    stop = False

    async def worker() -> None:
        while not stop:
            if not await _request(session, url, stream, tally):
                await asyncio.sleep(0.01)  # a failing server must not turn this into a spin

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        count0, t0 = (tally.events if stream else tally.ok), time.perf_counter()
        await asyncio.sleep(duration_s)
        count1, t1 = (tally.events if stream else tally.ok), time.perf_counter()
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    finally:
        for task in tasks:
            task.cancel()
    return (count1 - count0) / (t1 - t0), tally


async def sequential_latency(
    session: aiohttp.ClientSession, urls: dict[str, str], requests: int
) -> tuple[dict[str, list[float]], dict[str, Tally]]:
    """Latencies in ms of ``requests`` plain requests per path, one at a time, interleaved."""
    names = list(urls)
    tallies = {name: Tally() for name in names}
    for _ in range(20):  # warm up the connections
        for name in names:
            await _request(session, urls[name], False, tallies[name])
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(requests):
        shift = i % len(names)  # rotate the order so that no path always goes first
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            if await _request(session, urls[name], False, tallies[name]):
                samples[name].append((time.perf_counter() - t0) * 1000)
    return samples, tallies


def p50_p99(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    return statistics.median(values), statistics.quantiles(values, n=100)[98]


# -- the benchmark -------------------------------------------------------------------------

PATHS = ("direct", "gateway", "trivial")
LABELS = {"direct": "direct", "gateway": "gateway", "trivial": "trivial ceiling"}


async def bench(args: argparse.Namespace, bases: dict[str, str]) -> dict[str, Any]:
    urls = {name: base + CHAT_PATH for name, base in bases.items()}
    runs: list[dict[str, float]] = []
    errors: dict[str, Tally] = {name: Tally() for name in PATHS}

    def merge(name: str, tally: Tally) -> None:
        errors[name].errors.update(tally.errors)
        room = ERROR_SAMPLES - len(errors[name].samples)
        errors[name].samples.extend(tally.samples[: max(room, 0)])

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
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
            print(f"run {run}/{args.runs}: {shown}", file=sys.stderr, flush=True)
    medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return {"medians": medians, "runs": runs, "errors": errors}


def start_all(args: argparse.Namespace, procs: Processes, redis_url: str | None) -> dict[str, str]:
    """Start node, gateway and trivial app; return each path's base URL once it answers."""
    py = sys.executable
    node_port, gateway_port, trivial_port = free_port(), free_port(), free_port()
    node_argv = [py, "-m", "gateway.sim.node", "--port", str(node_port), "--tokens-per-s", "inf"]
    # Enough batch slots that the instant node never queues: the baseline must not wait.
    node = procs.start("node", [*node_argv, "--model", MODEL, "--slots", "1024"])
    here = str(Path(__file__).resolve())
    trivial = procs.start("trivial", [py, here, "--serve-trivial", str(trivial_port)])
    procs.wait_port(node, node_port)
    node_url = f"http://127.0.0.1:{node_port}"
    argv = [py, "-m", "gateway", "--port", str(gateway_port), "--node", node_url]
    argv += ["--strategy", args.strategy]
    if redis_url is not None:
        argv += ["--redis-url", redis_url]
    gateway = procs.start("gateway", argv)
    procs.wait_port(gateway, gateway_port)
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    wait_model_listed(gateway, gateway_url)
    procs.wait_port(trivial, trivial_port)
    bases = {
        "direct": node_url,
        "gateway": gateway_url,
        "trivial": f"http://127.0.0.1:{trivial_port}",
    }
    for name, base in bases.items():
        check_answers(base, name)
    return bases


def log_findings(child: Child) -> list[str]:
    """Warnings, errors and tracebacks a child logged."""
    try:
        lines = child.log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    marks = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
    return [line for line in lines if any(mark in line for mark in marks)]


def _verdict(ok: bool) -> str:
    return "holds" if ok else "MISSED"


def report(
    args: argparse.Namespace, result: dict[str, Any], findings: dict[str, list[str]]
) -> None:
    m: dict[str, float] = result["medians"]
    errors: dict[str, Tally] = result["errors"]
    c = args.concurrency
    print(
        f"fleetgate gateway benchmark: one worker, store {args.store}, strategy {args.strategy}; "
        f"medians of {args.runs} run(s); {args.duration:g} s per load measurement"
    )
    head = f"{'path':<16} {f'req/s (c={c})':>14} {f'SSE events/s (c={c})':>21}"
    print(f"{head} {'p50 ms (c=1)':>13} {'p99 ms (c=1)':>13}")
    for name in PATHS:
        sse = f"{m[name + '.sse']:,.0f}" if f"{name}.sse" in m else "-"
        print(
            f"{LABELS[name]:<16} {m[name + '.rps']:>14,.0f} {sse:>21} "
            f"{m[name + '.p50']:>13.3f} {m[name + '.p99']:>13.3f}"
        )
    rps_ratio = m["gateway.rps"] / m["trivial.rps"]
    sse_ratio = m["gateway.sse"] / m["direct.sse"]
    added_p50 = m["gateway.p50"] - m["direct.p50"]
    added_p99 = m["gateway.p99"] - m["direct.p99"]
    targets = {
        "rps_vs_trivial_ge_50pct": rps_ratio >= 0.5,
        "sse_vs_direct_ge_25pct": sse_ratio >= 0.25,
        "added_p50_le_1ms": added_p50 <= 1.0,
    }
    print()
    print(
        f"gateway req/s vs trivial ceiling: {rps_ratio:.1%} (target >= 50%): "
        f"{_verdict(targets['rps_vs_trivial_ge_50pct'])}"
    )
    print(
        f"gateway SSE events/s vs direct:   {sse_ratio:.1%} (target >= 25%): "
        f"{_verdict(targets['sse_vs_direct_ge_25pct'])}"
    )
    print(
        f"added p50 latency at c=1:         {added_p50:.3f} ms (target <= 1 ms): "
        f"{_verdict(targets['added_p50_le_1ms'])}  (added p99 {added_p99:.3f} ms)"
    )
    n_errors = {name: sum(t.errors.values()) for name, t in errors.items()}
    for name, tally in errors.items():
        if tally.errors:
            kinds = ", ".join(f"{k} x{v}" for k, v in tally.errors.most_common())
            print(f"ERRORS on {name}: {kinds}")
            for sample in tally.samples:
                print(f"  {sample}")
    for name, lines in findings.items():
        if lines:
            print(f"{name} logged {len(lines)} warning/error line(s), first ones:")
            for text in lines[:5]:
                print(f"  {text[:300]}")
    figures = {
        name: {
            key.split(".", 1)[1]: round(value, 3 if key.endswith(("p50", "p99")) else 1)
            for key, value in m.items()
            if key.startswith(name + ".")
        }
        for name in PATHS
    }
    line: dict[str, Any] = {
        "bench": "gateway",
        "store": args.store,
        "strategy": args.strategy,
        "runs": args.runs,
        "duration_s": args.duration,
        "concurrency": c,
        "latency_requests": args.latency_requests,
        **figures,
        "rps_vs_trivial": round(rps_ratio, 4),
        "sse_vs_direct": round(sse_ratio, 4),
        "added_p50_ms": round(added_p50, 3),
        "added_p99_ms": round(added_p99, 3),
        "targets": targets,
        "all_targets_hold": all(targets.values()),
        "errors": n_errors,
        "log_findings": {name: len(lines) for name, lines in findings.items()},
    }
    print(json.dumps(line))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=3, help="runs; figures are medians (default 3)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per load measurement")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    p.add_argument("--concurrency", type=int, default=32, help="clients in the load tests")
    p.add_argument("--latency-requests", type=int, default=300, help="per path per run, c=1")
    p.add_argument("--store", choices=("redis", "embedded"), default="redis")
    p.add_argument("--strategy", default="min_expected_latency", help="the gateway's strategy")
    p.add_argument("--serve-trivial", type=int, metavar="PORT", help="only serve the trivial app")
    args = p.parse_args(argv)
    if args.serve_trivial is not None:
        return serve_trivial(args.serve_trivial)
    if args.runs < 1 or args.duration <= 0 or args.concurrency < 1 or args.latency_requests < 2:
        p.error("--runs, --concurrency >= 1; --duration > 0; --latency-requests >= 2")

    signal.signal(signal.SIGTERM, _interrupt)
    log_dir = Path(tempfile.mkdtemp(prefix="fleetgate-bench-"))
    procs = Processes(log_dir)
    redis: Any = None
    try:
        try:
            redis_url: str | None = None
            if args.store == "redis":
                from scripts.bench.harness import RedisServer

                redis = RedisServer()
                redis.start()
                redis_url = redis.url
            bases = start_all(args, procs, redis_url)
        except (StartupError, RuntimeError, TimeoutError, OSError) as exc:
            print(f"bench_gateway: start-up failed: {exc}", file=sys.stderr)
            return 1
        print(f"started: {bases}; logs in {log_dir}", file=sys.stderr, flush=True)
        result = asyncio.run(bench(args, bases))
        dead = [c for c in procs.children if c.proc.poll() is not None]
        findings = {c.name: log_findings(c) for c in procs.children}
        report(args, result, findings)
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
