"""The routing benchmark as one run: the fleet started, the parts asked for measured in turn,
the targets judged; and the files it writes (results.json, results.md, the charts)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

from scripts.bench.charts import write_charts
from scripts.bench.comparison import compare
from scripts.bench.drills import drills
from scripts.bench.fleet import EXPECTED_LOG, Fleet
from scripts.bench.harness import Interrupted, log_findings
from scripts.bench.page import write_markdown
from scripts.bench.report import clean
from scripts.bench.scale import scale
from scripts.bench.scenario import Lengths, Scenario
from scripts.bench.targets import evaluate


def machine() -> dict[str, Any]:
    """CPUs, CPU model and Python version of this machine, as the results record them."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version()}


async def measure(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Run the parts of ``--parts`` on a fleet logging to ``log_dir``; the whole result, with
    its targets. A SIGINT or SIGTERM raises :class:`Interrupted` once all is stopped."""
    started = time.monotonic()
    scenario = Scenario(
        args.nodes,
        Lengths(args.median_tokens, args.sigma, args.max_tokens),
        args.load,
        args.stream_fraction,
    )
    fleet = Fleet(log_dir)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal() -> None:
        fleet.interrupted = True
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    result: dict[str, Any] = {
        "bench": "routing",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python scripts/bench_routing.py", *sys.argv[1:]]).strip(),
        "machine": machine(),
        "runs": args.runs,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "seed": args.seed,
        "scenario": scenario.describe(),
    }
    try:
        fleet.start_redis()
        for spec in scenario.nodes:
            fleet.start_node(spec)
        parts = set(args.parts)
        if "compare" in parts:
            result["comparison"] = await compare(fleet, scenario, args)
        if "scale" in parts:
            result["scale"] = await scale(fleet, args)
        if "drills" in parts:
            result["drills"] = await drills(fleet, scenario, args)
        result["log_findings"] = {
            "nodes": log_findings((c for _s, c in fleet.nodes.values()), EXPECTED_LOG),
        }
    except Exception:
        if fleet.interrupted:  # the children got the signal too: what failed next is no news
            raise Interrupted from None
        raise
    finally:
        await fleet.close()
    if fleet.interrupted:
        raise Interrupted
    result["targets"] = evaluate(result)
    result["elapsed_s"] = time.monotonic() - started
    return result


def write_files(result: dict[str, Any], out: Path) -> list[str]:
    """Write the charts, results.json and results.md into ``out``; the names written."""
    out.mkdir(parents=True, exist_ok=True)
    charts = write_charts(result, out)
    (out / "results.json").write_text(json.dumps(clean(result), indent=1) + "\n")
    write_markdown(result, out, charts)
    return ["results.json", "results.md", *charts]


def replot(results_json: Path, out: Path) -> None:
    """Redraw the charts and results.md of a saved results.json into ``out``, measuring
    nothing (the targets are judged again from its figures)."""
    result = json.loads(results_json.read_text())
    out.mkdir(parents=True, exist_ok=True)
    result["targets"] = evaluate(result)
    write_markdown(result, out, write_charts(result, out))
