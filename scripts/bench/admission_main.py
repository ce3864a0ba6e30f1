"""The admission benchmark from the command line (scripts/bench_admission.py): its options and
their defaults, the runs on one Redis, and the files written (admission.json, admission.md and
admission.png)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from scripts.bench.admission_charts import write_admission_chart
from scripts.bench.admission_page import write_admission_markdown
from scripts.bench.admission_report import admission_summary_line, print_admission_report
from scripts.bench.admission_runs import run_admission
from scripts.bench.admission_targets import evaluate_admission
from scripts.bench.admission_workload import AdmissionScenario, setups
from scripts.bench.fleet import Fleet
from scripts.bench.harness import ROOT, Interrupted, StartupError, interrupt_on_sigterm, progress
from scripts.bench.report import clean
from scripts.bench.routing import machine

SETUPS = ("admission", "default-reserve", "none")


def parser(doc: str) -> argparse.ArgumentParser:
    """The benchmark's options."""
    w = AdmissionScenario()
    p = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 run of 6 s")
    p.add_argument("--runs", type=int, help="runs; figures are medians (3; quick 1)")
    p.add_argument(
        "--duration", type=float, help=f"s of load per phase ({w.duration_s:g}; quick 6)"
    )
    p.add_argument(
        "--warmup", type=float, help=f"s before the window opens ({w.warmup_s:g}; quick 2)"
    )
    p.add_argument("--seed", type=int, default=1, help="run r uses seed + r (default 1)")
    p.add_argument("--setups", default="admission,none", help="comma list of " + ", ".join(SETUPS))
    p.add_argument("--out", type=Path, help="where to write (default docs/benchmarks)")
    p.add_argument("--replot", type=Path, metavar="ADMISSION_JSON", help="redraw from it")
    g = p.add_argument_group("scenario")
    g.add_argument("--nodes", type=int, default=w.nodes, help="simulated nodes")
    g.add_argument("--max-inflight", type=int, default=w.max_inflight, help="= their slots")
    g.add_argument("--tokens-per-s", type=float, default=w.tokens_per_s, help="per sequence")
    g.add_argument("--min-tokens", type=int, default=w.min_tokens, help="shortest answer")
    g.add_argument("--max-tokens", type=int, default=w.max_tokens, help="longest answer")
    g.add_argument("--clients", type=int, default=w.clients, help="key b's loops")
    g.add_argument("--heavy", type=int, default=w.heavy, help="key a runs this many times b's")
    g.add_argument("--high-fraction", type=float, default=w.high_fraction, help="of capacity")
    g.add_argument("--reserve", type=float, default=w.reserve, help="--priority-reserve")
    g.add_argument("--replicas", type=int, default=w.replicas, help="gateways sharing Redis")
    g.add_argument("--client-timeout", type=float, default=w.client_timeout_s, help="s")
    return p


def settle(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the defaults that depend on ``--quick``, check the options, build the scenario."""
    for name, full, small in (("runs", 3, 1), ("duration", 60.0, 6.0), ("warmup", 5.0, 2.0)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    chosen = [x.strip() for x in args.setups.split(",") if x.strip()]
    if not chosen or not set(chosen) <= set(SETUPS) or len(set(chosen)) != len(chosen):
        p.error("--setups is a comma list of " + ", ".join(SETUPS))
    if args.runs < 1:
        p.error("--runs >= 1")
    try:
        args.scenario = AdmissionScenario(
            nodes=args.nodes,
            max_inflight=args.max_inflight,
            tokens_per_s=args.tokens_per_s,
            min_tokens=args.min_tokens,
            max_tokens=args.max_tokens,
            clients=args.clients,
            heavy=args.heavy,
            high_fraction=args.high_fraction,
            duration_s=args.duration,
            warmup_s=args.warmup,
            reserve=args.reserve,
            replicas=args.replicas,
            client_timeout_s=args.client_timeout,
        )
    except ValueError as exc:
        p.error(str(exc))
    known = setups(args.reserve)
    # The judged set-up first: the idle fleet is registered as it is.
    args.setup_list = [known[k] for k in sorted(chosen, key=SETUPS.index)]


async def measure_admission(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Every run on one Redis; the whole result with its targets. A SIGINT or SIGTERM raises
    :class:`Interrupted` once all is stopped."""
    started = time.monotonic()
    fleet = Fleet(log_dir)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal() -> None:
        fleet.interrupted = True
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    scenario: AdmissionScenario = args.scenario
    result: dict[str, Any] = {
        "bench": "admission",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python scripts/bench_admission.py", *sys.argv[1:]]).strip(),
        "machine": machine(),
        "seed": args.seed,
        "runs": args.runs,
        "scenario": scenario.describe(),
    }
    try:
        fleet.start_redis()
        found = await run_admission(fleet, scenario, args.setup_list, args.runs, args.seed)
        result.update(found)
    except Exception:
        if fleet.interrupted:  # the children got the signal too: what failed next is no news
            raise Interrupted from None
        raise
    finally:
        await fleet.close()
    if fleet.interrupted:
        raise Interrupted
    result["targets"] = evaluate_admission(result)
    result["elapsed_s"] = time.monotonic() - started
    return result


def write_admission_files(result: dict[str, Any], out: Path) -> list[str]:
    """Write the chart, admission.json and admission.md into ``out``; the names written."""
    out.mkdir(parents=True, exist_ok=True)
    charts = write_admission_chart(result, out)
    (out / "admission.json").write_text(json.dumps(clean(result), indent=1) + "\n")
    write_admission_markdown(result, out, charts)
    return ["admission.json", "admission.md", *charts]


def _nan(obj: Any) -> Any:
    """Saved JSON with null figures as NaN again."""
    if obj is None:
        return float("nan")
    if isinstance(obj, dict):
        return {k: _nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan(v) for v in obj]
    return obj


def replot_admission(saved: Path, out: Path) -> None:
    """Redraw the chart and admission.md of a saved admission.json (targets judged again)."""
    result = _nan(json.loads(saved.read_text()))
    result["targets"] = evaluate_admission(result)
    out.mkdir(parents=True, exist_ok=True)
    write_admission_markdown(result, out, write_admission_chart(result, out))


def admission_main(doc: str, argv: list[str] | None = None) -> int:
    """Parse the options, measure, print the report and the JSON line, write the files; the
    exit status (0 even when a target fails: the verdicts are printed)."""
    p = parser(doc)
    args = p.parse_args(argv)
    if args.replot is not None:
        replot_admission(args.replot, args.out or args.replot.parent)
        return 0
    settle(p, args)
    out: Path | None = args.out
    if out is None and not args.quick:
        out = ROOT / "docs" / "benchmarks"
    interrupt_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="fleetgate-bench-admission-"))
    try:
        try:
            result = asyncio.run(measure_admission(args, log_dir))
        except (StartupError, RuntimeError, TimeoutError, OSError, RedisError) as exc:
            print(f"bench_admission: failed: {exc}", file=sys.stderr)
            return 1
        print_admission_report(result)
        if out is not None:
            written = write_admission_files(result, out)
            progress(f"wrote {', '.join(written)} to {out}")
        print(f"elapsed: {result['elapsed_s']:.0f} s")
        print(json.dumps(admission_summary_line(result)))
        return 0
    except (KeyboardInterrupt, Interrupted, asyncio.CancelledError):
        print("bench_admission: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
