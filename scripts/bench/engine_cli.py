"""The routing benchmark's ``--engines llama`` mode: its options, its defaults, and one run of
it from the command line to the files it writes (engines.json, engines.md, engines.png)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from scripts.bench.engine_charts import write_engine_charts
from scripts.bench.engine_report import (
    engine_summary_line,
    print_engine_report,
    write_engine_markdown,
)
from scripts.bench.engine_runs import measure_engines
from scripts.bench.harness import ROOT, Interrupted, StartupError, interrupt_on_sigterm, progress
from scripts.bench.llama_nodes import DEFAULT_LLAMAS, parse_llamas
from scripts.bench.report import clean

# (name, full run, --quick): the defaults of the options shared with the simulated scenario.
DEFAULTS = (
    ("runs", 3, 1),
    ("load", 0.8, 0.8),
    # Every turn streamed: TTFT, the figure a prefix hit changes most, is then known for each.
    ("stream_fraction", 1.0, 1.0),
    ("engine_requests", 48, 16),
    ("engine_warmup", 12, 4),
)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the engine scenario (``--engines llama`` turns it on)."""
    g = p.add_argument_group("real engines (--engines llama)")
    g.add_argument(
        "--engines",
        choices=["llama"],
        help="run the chat scenario on real llama-servers instead of simulated nodes",
    )
    g.add_argument("--engine-model", default="llama-big", help="model (default llama-big)")
    g.add_argument(
        "--llamas",
        type=parse_llamas,
        default=DEFAULT_LLAMAS,
        help="name:threads:parallel:cache_mib,... (default: "
        + ",".join(f"{s.name}:{s.threads}:{s.parallel}:{s.cache_mib}" for s in DEFAULT_LLAMAS)
        + ")",
    )
    g.add_argument("--engine-replicas", type=int, default=4, help="gateways sharing Redis (4)")
    g.add_argument(
        "--engine-rate", type=float, help="turns/s (default: --load x the measured cold capacity)"
    )
    g.add_argument("--engine-requests", type=int, help="turns per run (48; --quick 16)")
    g.add_argument("--engine-warmup", type=int, help="of them not counted (12; --quick 4)")
    g.add_argument("--chat-prompts", type=int, default=8, help="system prompts (8)")
    g.add_argument("--chat-prompt-words", type=int, default=800, help="words of each (800)")
    g.add_argument("--chat-turns", type=int, default=4, help="turns per conversation (4)")
    g.add_argument("--chat-user-words", type=int, default=40, help="words per question (40)")
    g.add_argument("--chat-answer-tokens", type=int, default=16, help="tokens per answer (16)")
    g.add_argument("--chat-conversations", type=int, default=12, help="open at once (12)")
    g.add_argument("--chat-gap", type=float, default=4.0, help="s between turns, at least (4)")


def engine_main(args: argparse.Namespace, out: Path | None) -> int:
    """Measure, print the report and the JSON line, write the files into ``out`` (none if
    None); the exit status."""
    for name, full, quick in DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if not 0 <= args.engine_warmup < args.engine_requests:
        print("bench_routing: 0 <= --engine-warmup < --engine-requests", file=sys.stderr)
        return 2
    interrupt_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="fleetgate-bench-engines-"))
    try:
        try:
            result = asyncio.run(measure_engines(args, log_dir))
        except (StartupError, RuntimeError, TimeoutError, OSError, RedisError) as exc:
            print(f"bench_routing: failed: {exc}", file=sys.stderr)
            return 1
        print_engine_report(result)
        if out is not None:
            written = write_engine_files(result, out)
            progress(f"wrote {', '.join(written)} to {_shown(out)}")
        print(f"elapsed: {result['elapsed_s']:.0f} s")
        print(json.dumps(engine_summary_line(result)))
        return 0
    except (KeyboardInterrupt, Interrupted, asyncio.CancelledError):
        print("bench_routing: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_engine_files(result: dict[str, Any], out: Path) -> list[str]:
    """Write the chart, engines.json and engines.md into ``out``; the names written."""
    out.mkdir(parents=True, exist_ok=True)
    charts = write_engine_charts(result, out)
    (out / "engines.json").write_text(json.dumps(clean(result), indent=1) + "\n")
    write_engine_markdown(result, out, charts)
    return ["engines.json", "engines.md", *charts]


def replot_engines(result: dict[str, Any], out: Path) -> None:
    """Redraw the chart and engines.md of a saved engines.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_engine_markdown(result, out, write_engine_charts(result, out))
