"""The cache benchmark from the command line (scripts/bench_cache.py): its options and their
defaults, the scenarios run in order on one Redis, and the files written (cache.json,
cache.md and a chart per scenario)."""

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

from scripts.bench.cache_charts import write_cache_charts
from scripts.bench.cache_engines import CACHE_LLAMAS, ENGINE_WORKLOAD, run_engine_scenario
from scripts.bench.cache_nodes import EQUAL_NODES, UNEQUAL_NODES, parse_cache_nodes
from scripts.bench.cache_report import (
    cache_summary_line,
    ordered,
    print_cache_report,
    write_cache_markdown,
)
from scripts.bench.cache_runs import (
    CHAT_SETUPS,
    QUICK_SETUPS,
    UNEQUAL_SETUPS,
    SimScenario,
    run_sim_scenario,
    scrub,
)
from scripts.bench.cache_targets import evaluate_cache
from scripts.bench.cache_workload import CacheWorkload, bytes_per_token
from scripts.bench.fleet import Fleet
from scripts.bench.harness import ROOT, Interrupted, StartupError, interrupt_on_sigterm, progress
from scripts.bench.llama_nodes import parse_llamas
from scripts.bench.load import MODEL
from scripts.bench.report import clean
from scripts.bench.routing import machine
from shared_state.prefix import CACHE_UNITS

PARTS = ("chats", "unequal", "engines")


def _nodes(text: str) -> tuple[Any, ...]:
    try:
        return parse_cache_nodes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _spec(nodes: tuple[Any, ...]) -> str:
    return ",".join(
        f"{n.name}:{n.slots}:{n.tokens_per_s:g}:{n.prefill_tokens_per_s:g}:{n.cache_blocks}"
        for n in nodes
    )


def parser(doc: str) -> argparse.ArgumentParser:
    """The benchmark's options."""
    p = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 run, 16 chats, 2 set-ups")
    p.add_argument("--runs", type=int, help="runs per set-up; figures are medians (3; quick 1)")
    p.add_argument("--seed", type=int, default=1, help="run r uses seed + r (default 1)")
    p.add_argument("--load", type=float, default=0.7, help="fraction of cold capacity (0.7)")
    p.add_argument("--warmup-turns", type=int, help="first turns not counted (32; quick 4)")
    p.add_argument("--only", help="comma list: run only set-ups whose key has one of these")
    p.add_argument("--out", type=Path, help="where to write (default docs/benchmarks)")
    p.add_argument("--replot", type=Path, metavar="CACHE_JSON", help="redraw from a cache.json")
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the other parts of the cache.json in --out (same workload), replace these",
    )
    w = CacheWorkload()
    g = p.add_argument_group("chats")
    g.add_argument("--conversations", type=int, help=f"per run ({w.conversations}; quick 16)")
    g.add_argument("--prompts", type=int, default=w.prompts, help="system prompts")
    g.add_argument("--prompt-words", type=int, default=w.prompt_words, help="words of each")
    g.add_argument("--min-turns", type=int, default=w.min_turns)
    g.add_argument("--max-turns", type=int, default=w.max_turns)
    g.add_argument("--user-words", type=int, default=w.user_words, help="words per question")
    g.add_argument("--answer-tokens", type=int, default=w.answer_tokens, help="tokens per answer")
    g.add_argument("--open-at-once", type=int, default=w.open_at_once, help="chats open at once")
    g.add_argument("--min-gap", type=float, default=w.min_gap_s, help="s between turns, at least")
    g.add_argument("--stream-fraction", type=float, default=w.stream_fraction)
    g = p.add_argument_group("simulated nodes")
    g.add_argument("--nodes", type=_nodes, default=EQUAL_NODES, help=_spec(EQUAL_NODES))
    g.add_argument("--unequal-nodes", type=_nodes, default=UNEQUAL_NODES, help=_spec(UNEQUAL_NODES))
    g = p.add_argument_group("real engines (part engines)")
    g.add_argument("--engine-model", default="llama-big", help="model (default llama-big)")
    g.add_argument(
        "--llamas",
        type=parse_llamas,
        default=CACHE_LLAMAS,
        help="name:threads:slots:cache_mib[:save],... (llama-1:1:1:48:save to llama-4)",
    )
    g.add_argument("--engine-replicas", type=int, default=4, help="gateways sharing Redis (4)")
    g.add_argument(
        "--engine-cache-unit",
        choices=CACHE_UNITS,
        default="prompts",
        help="the gateways' --prefix-cache-unit (prompts: llama-server keeps whole prompts)",
    )
    g.add_argument("--engine-runs", type=int, help="runs per set-up (3; quick 1)")
    g.add_argument("--engine-load", type=float, default=0.5, help="of cold capacity (0.5)")
    g.add_argument("--engine-rate", type=float, help="turns/s instead of --engine-load")
    g.add_argument(
        "--engine-conversations",
        type=int,
        help=f"per run ({ENGINE_WORKLOAD.conversations}; quick 4)",
    )
    g.add_argument("--engine-prompt-words", type=int, default=ENGINE_WORKLOAD.prompt_words)
    g.add_argument("--engine-warmup-turns", type=int, help="first turns not counted (6; quick 2)")
    return p


def settle(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the defaults that depend on ``--quick`` and check the options."""
    quick = args.quick
    for name, full, small in (
        ("runs", 3, 1),
        ("engine_runs", 3, 1),
        ("conversations", 64, 16),
        ("warmup_turns", 32, 4),
        ("engine_conversations", ENGINE_WORKLOAD.conversations, 4),
        ("engine_warmup_turns", 6, 2),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.parts or not set(args.parts) <= set(PARTS):
        p.error("--parts is a comma list of " + ", ".join(PARTS))
    args.only = [x.strip() for x in (args.only or "").split(",") if x.strip()]
    if args.runs < 1 or args.engine_runs < 1 or not 0 < args.load < 1.5:
        p.error("--runs, --engine-runs >= 1; 0 < --load < 1.5")
    if not 0 < args.engine_load < 1.5 or args.engine_replicas < 2:
        p.error("0 < --engine-load < 1.5; --engine-replicas >= 2 (1 replica runs anyway)")
    if args.engine_rate is not None and args.engine_rate <= 0:
        p.error("--engine-rate > 0")
    try:
        args.workload = CacheWorkload(
            args.prompts,
            args.prompt_words,
            args.conversations,
            args.min_turns,
            args.max_turns,
            args.user_words,
            args.answer_tokens,
            args.open_at_once,
            args.min_gap,
            args.stream_fraction,
        )
        base = ENGINE_WORKLOAD
        args.engine_workload = CacheWorkload(
            base.prompts,
            args.engine_prompt_words,
            args.engine_conversations,
            base.min_turns,
            base.max_turns,
            base.user_words,
            base.answer_tokens,
            min(base.open_at_once, args.engine_conversations),
            base.min_gap_s,
            base.stream_fraction,
        )
    except ValueError as exc:
        p.error(str(exc))
    turns = args.workload.conversations * args.workload.min_turns
    if not 0 <= args.warmup_turns < turns:
        p.error(f"0 <= --warmup-turns < {turns} (the fewest turns a run can have)")


def _scenarios(args: argparse.Namespace) -> list[SimScenario]:
    out = []
    for name, nodes, setups in (
        ("chats", args.nodes, QUICK_SETUPS if args.quick else CHAT_SETUPS),
        ("unequal", args.unequal_nodes, QUICK_SETUPS[1:] if args.quick else UNEQUAL_SETUPS),
    ):
        if name not in args.parts:
            continue
        kept = tuple(s for s in setups if not args.only or any(w in s.key for w in args.only))
        if kept:
            out.append(SimScenario(name, nodes, kept, args.load))
    return out


async def measure_cache(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Run the parts of ``--parts`` on one Redis; the whole result with its targets. A SIGINT
    or SIGTERM raises :class:`Interrupted` once all is stopped."""
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
    per_token = bytes_per_token(args.workload, MODEL)
    result: dict[str, Any] = {
        "bench": "cache",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python scripts/bench_cache.py", *sys.argv[1:]]).strip(),
        "machine": machine(),
        "seed": args.seed,
        "workload": args.workload.describe(),
        "warmup_turns": args.warmup_turns,
        "bytes_per_token": per_token,
        "scenarios": {},
    }
    try:
        fleet.start_redis()
        for scenario in _scenarios(args):
            progress(f"{scenario.name}: {len(scenario.setups)} set-ups x {args.runs} runs")
            t = time.monotonic()
            found = await run_sim_scenario(fleet, scenario, args.workload, per_token, args)
            result["scenarios"][scenario.name] = {**found, **_stamp(result, t)}
        if "engines" in args.parts:
            t = time.monotonic()
            found = await run_engine_scenario(fleet, args.llamas, args)
            result["scenarios"]["engines"] = {**found, **_stamp(result, t)}
    except Exception:
        if fleet.interrupted:  # the children got the signal too: what failed next is no news
            raise Interrupted from None
        raise
    finally:
        await fleet.close()
    if fleet.interrupted:
        raise Interrupted
    result["targets"] = evaluate_cache(result)
    result["elapsed_s"] = time.monotonic() - started
    return result


def _stamp(result: dict[str, Any], started: float) -> dict[str, Any]:
    """When and how a scenario was measured (an update keeps the others' own)."""
    elapsed = time.monotonic() - started
    return {"date": result["date"], "command": result["command"], "elapsed_s": elapsed}


def merged(result: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the scenarios of ``saved`` it did not measure (an earlier cache.json of
    the same workload and warm-up); ValueError if they differ."""
    for key in ("workload", "warmup_turns", "seed"):
        if saved.get(key) != result[key]:
            raise ValueError(f"{key} differs from the saved one: {saved.get(key)!r}")
    old = {k: v for k, v in _nan(saved["scenarios"]).items() if k not in result["scenarios"]}
    out = {**result, "scenarios": ordered({**old, **result["scenarios"]})}
    out["elapsed_s"] = result["elapsed_s"] + sum(s.get("elapsed_s", 0.0) for s in old.values())
    out["targets"] = evaluate_cache(out)
    return out


def scrubbed(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with every log line it keeps made fit to publish (:func:`scrub`)."""
    for scenario in result.get("scenarios", {}).values():
        if "log_findings_nodes" in scenario:
            scenario["log_findings_nodes"] = scrub(scenario["log_findings_nodes"])
        for row in scenario.get("comparison", {}).values():
            row["log_findings"] = scrub(row.get("log_findings", []))
    return result


def write_cache_files(result: dict[str, Any], out: Path) -> list[str]:
    """Write the charts, cache.json and cache.md into ``out``; the names written."""
    result = scrubbed(result)
    out.mkdir(parents=True, exist_ok=True)
    charts = write_cache_charts(result, out)
    (out / "cache.json").write_text(json.dumps(clean(result), indent=1) + "\n")
    write_cache_markdown(result, out, charts)
    return ["cache.json", "cache.md", *charts]


def replot_cache(saved: Path, out: Path) -> None:
    """Redraw the charts and cache.md of a saved cache.json into ``out`` (the targets judged
    again from its figures)."""
    result = json.loads(saved.read_text(), parse_constant=float)
    result = _nan(result)
    result["targets"] = evaluate_cache(result)
    out.mkdir(parents=True, exist_ok=True)
    write_cache_markdown(result, out, write_cache_charts(result, out))


def _nan(obj: Any) -> Any:
    """Saved JSON with null figures as NaN again."""
    if obj is None:
        return float("nan")
    if isinstance(obj, dict):
        return {k: _nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan(v) for v in obj]
    return obj


def cache_main(doc: str, argv: list[str] | None = None) -> int:
    """Parse the options, measure, print the report and the JSON line, write the files; the
    exit status (0 even when a target fails: the verdicts are printed)."""
    p = parser(doc)
    args = p.parse_args(argv)
    if args.replot is not None:
        replot_cache(args.replot, args.out or args.replot.parent)
        return 0
    settle(p, args)
    out: Path | None = args.out
    if out is None and not args.quick:
        out = ROOT / "docs" / "benchmarks"
    interrupt_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="fleetgate-bench-cache-"))
    try:
        try:
            result = asyncio.run(measure_cache(args, log_dir))
        except (StartupError, RuntimeError, TimeoutError, OSError, RedisError) as exc:
            print(f"bench_cache: failed: {exc}", file=sys.stderr)
            return 1
        if args.update and out is not None and (out / "cache.json").exists():
            try:
                result = merged(result, json.loads((out / "cache.json").read_text()))
            except ValueError as exc:
                print(f"bench_cache: cannot update {out / 'cache.json'}: {exc}", file=sys.stderr)
                return 1
        print_cache_report(result)
        if out is not None:
            written = write_cache_files(result, out)
            progress(f"wrote {', '.join(written)} to {out}")
        print(f"elapsed: {result['elapsed_s']:.0f} s")
        print(json.dumps(cache_summary_line(result)))
        return 0
    except (KeyboardInterrupt, Interrupted, asyncio.CancelledError):
        print("bench_cache: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
