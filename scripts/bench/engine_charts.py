"""The engine scenario's chart (engines.png, with matplotlib when it is installed): latency,
time to first token, prefix hit rate and each engine's share by strategy, on real
llama-servers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from scripts.bench.harness import progress

_SHARED = "#55a868"
_ONE = "#4c72b0"
_ENGINES = "#dd8452"
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _v(value: float | None) -> float:
    """A figure as saved (None where it was NaN) as a float, NaN for None."""
    return math.nan if value is None else float(value)


def _label(row: dict[str, Any]) -> str:
    return str(row["strategy"]).replace("_", "_\n") + f"\n({row['mode']})"


def _note(ax: Any, x: float, y: float, text: str) -> None:
    ax.annotate(
        text,
        (x, y),
        ha="center",
        va="bottom",
        fontsize=7,
        xytext=(0, 1),
        textcoords="offset points",
    )


def _bars(ax: Any, rows: list[dict[str, Any]], figures: tuple[str, ...], title: str) -> None:
    """A bar per set-up of the first figure, with black marks for the others (p50 dot, p90 dash,
    p99 triangle; a None leaves its mark out)."""
    bar, *marks = figures
    for xi, row in enumerate(rows):
        m = row["median"]
        color = _ONE if row["replicas"] == 1 else _SHARED
        height = _v(m[bar])
        ax.bar(xi, 0 if math.isnan(height) else height, color=color, alpha=0.85, width=0.7)
        if not math.isnan(height):
            _note(ax, xi, height, f"{height:,.0f}")
        for key, (marker, size) in zip(marks, (("o", 4), ("_", 12), ("v", 5)), strict=True):
            if key and not math.isnan(_v(m[key])):
                ax.plot(xi, _v(m[key]), marker, color="black", ms=size, mew=2)
    ax.set_xticks(range(len(rows)), [_label(r) for r in rows], fontsize=7)
    tops = [_v(r["median"][key]) for r in rows for key in figures if key]
    top = max((t for t in tops if not math.isnan(t)), default=1.0)
    ax.set_ylim(0, top * 1.3)  # room for the legend above the marks
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("ms")
    ax.grid(axis="y", alpha=0.3)


def write_engine_charts(result: dict[str, Any], out: Path) -> list[str]:
    """engines.png; returns the file names written (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        progress("matplotlib is not installed (pip install -e '.[bench]'): no charts")
        return []
    rows = list(result.get("comparison", {}).values())
    if not rows:
        return []
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    _bars(axes[0][0], rows, ("mean_ms", "p50_ms", "p90_ms", "p99_ms"), "Latency, send to last byte")
    _bars(axes[0][1], rows, ("ttft_p50_ms", "", "ttft_p90_ms", ""), "Time to first token, streams")
    axes[0][0].legend(
        handles=[
            Patch(color=_SHARED, label=f"mean, {result['engine_replicas']} replicas sharing Redis"),
            Patch(color=_ONE, label="mean, 1 replica"),
            Line2D([], [], marker="o", color="black", ls="", ms=4, label="p50"),
            Line2D([], [], marker="_", color="black", ls="", ms=12, mew=2, label="p90"),
            Line2D([], [], marker="v", color="black", ls="", ms=5, label="p99"),
        ],
        fontsize=7,
        loc="upper left",
        ncol=3,
    )
    axes[0][1].legend(
        handles=[
            Patch(color=_SHARED, label="p50"),
            Line2D([], [], marker="_", color="black", ls="", ms=12, mew=2, label="p90"),
        ],
        fontsize=7,
        loc="upper left",
    )
    ax = axes[1][0]
    width = 0.38
    for xi, row in enumerate(rows):
        m = row["median"]
        usage, engines = _v(m["hit_rate"]), _v(m["engine_hit_rate"])
        color = _ONE if row["replicas"] == 1 else _SHARED
        for dx, value, c in ((-width / 2, usage, color), (width / 2, engines, _ENGINES)):
            ax.bar(xi + dx, 0 if math.isnan(value) else value, width, color=c, alpha=0.85)
            if not math.isnan(value):
                _note(ax, xi + dx, value, f"{value:.0%}")
    ax.set_xticks(range(len(rows)), [_label(r) for r in rows], fontsize=7)
    ax.set_ylim(0, 1.2)
    ax.set_title("Prefix hit rate: cached / prompt tokens, as the engines count them", fontsize=10)
    ax.legend(
        handles=[
            Patch(color=_SHARED, label="usage.prompt_tokens_details.cached_tokens, measured turns"),
            Patch(color=_ENGINES, label="the engines' own counters, whole run"),
        ],
        fontsize=7,
        loc="upper left",
        ncol=2,
    )
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1][1]
    names = [e["name"] for e in result["engines"]]
    for y, row in enumerate(reversed(rows)):
        left = 0.0
        for j, name in enumerate(names):
            share = _v(row["median"]["shares"].get(name, 0.0))
            color = _PALETTE[j % len(_PALETTE)]
            ax.barh(
                y, share, left=left, color=color, edgecolor="white", label=name if not y else None
            )
            if share >= 0.08:
                ax.text(left + share / 2, y, f"{share:.0%}", ha="center", va="center", fontsize=8)
            left += share
    ax.set_yticks(
        range(len(rows)), [f"{r['strategy']} ({r['mode']})" for r in reversed(rows)], fontsize=8
    )
    ax.set_xlim(0, 1)
    ax.set_title("Each engine's share of the answered turns", fontsize=10)
    ax.legend(ncol=len(names), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.06))
    fig.suptitle(
        f"Real llama-server engines (not simulated): {len(result['engines'])} x "
        f"{result['model']}, multi-turn chats sharing {result['workload']['prompts']} system "
        f"prompts, {result['rate_rps']:.2f} turns/s ({result['load']:.0%} of cold capacity); "
        f"medians of {result['runs']} runs",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out / "engines.png", dpi=100)
    plt.close(fig)
    return ["engines.png"]
