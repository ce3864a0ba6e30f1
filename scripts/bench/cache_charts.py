"""The cache benchmark's charts (PNG, with matplotlib when it is installed): for each scenario,
hit rate, time to first token and latency by set-up; on unequal nodes also the slow and fast
nodes' p99."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from scripts.bench.harness import progress

_COLORS = {"1 replica": "#4c72b0", "shared": "#55a868", "private": "#c44e52"}
_NODES = "#dd8452"
_TITLES = {
    "chats": "Simulated nodes alike",
    "unequal": "Simulated nodes, two 1.5x slower",
    "engines": "Real llama-server engines (not simulated)",
}
FILES = {"chats": "cache.png", "unequal": "cache_unequal.png", "engines": "cache_engines.png"}


def _v(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _color(row: dict[str, Any]) -> str:
    if row["replicas"] == 1:
        return _COLORS["1 replica"]
    return _COLORS["shared" if row["shared"] else "private"]


def _label(row: dict[str, Any]) -> str:
    return str(row["strategy"]).replace("_", "_\n") + f"\n({row['mode']})"


def _annotate(ax: Any, x: float, y: float, text: str) -> None:
    ax.annotate(
        text,
        (x, y),
        ha="center",
        va="bottom",
        fontsize=7,
        xytext=(0, 1),
        textcoords="offset points",
    )


def _bars(ax: Any, rows: list[dict[str, Any]], bar: str, marks: list[tuple[str, str, int]]) -> None:
    for xi, row in enumerate(rows):
        m = row["median"]
        height = _v(m[bar])
        ax.bar(xi, 0 if math.isnan(height) else height, color=_color(row), alpha=0.85, width=0.7)
        if not math.isnan(height):  # at the bar's foot, clear of the quantile marks
            ax.annotate(
                f"{height:,.0f}",
                (xi, 0),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        for key, marker, size in marks:
            if not math.isnan(_v(m[key])):
                ax.plot(xi, _v(m[key]), marker, color="black", ms=size, mew=2)


def _chart(plt: Any, name: str, result: dict[str, Any], out: Path) -> str:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    scenario = result["scenarios"][name]
    rows = list(scenario["comparison"].values())
    panels = 4 if name == "unequal" else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 5.4))
    x = list(range(len(rows)))
    labels = [_label(r) for r in rows]
    ax = axes[0]
    width = 0.38
    for xi, row in zip(x, rows, strict=True):
        usage, nodes = _v(row["median"]["hit_rate"]), _v(row["median"]["node_hit_rate"])
        ax.bar(xi - width / 2, 0 if math.isnan(usage) else usage, width, color=_color(row))
        ax.bar(xi + width / 2, 0 if math.isnan(nodes) else nodes, width, color=_NODES, alpha=0.85)
        if not math.isnan(usage):
            _annotate(ax, xi - width / 2, usage, f"{usage:.0%}")
    ax.set_ylim(0, 1.1)
    ax.set_title("Prefix hit rate (cached / prompt tokens)", fontsize=10)
    ax.legend(
        handles=[
            Patch(color="#888888", label="usage cached_tokens, measured turns"),
            Patch(color=_NODES, label="nodes' counters, whole run"),
        ],
        fontsize=7,
        loc="lower right",
    )
    p50 = ("ttft_p50_ms", "o", 4)
    p90 = ("ttft_p90_ms", "_", 12)
    _bars(axes[1], rows, "ttft_mean_ms", [p50, p90])
    axes[1].set_title("Time to first token, ms (bar: mean; o p50, - p90)", fontsize=10)
    marks = [("p50_ms", "o", 4), ("p90_ms", "_", 12), ("p99_ms", "v", 5)]
    _bars(axes[2], rows, "mean_ms", marks)
    axes[2].set_title("Latency to last byte, ms (bar: mean; o p50, - p90, v p99)", fontsize=10)
    if name == "unequal":
        ax = axes[3]
        for xi, row in zip(x, rows, strict=True):
            c = row["median"].get("classes", {})
            for dx, label, color in (
                (-width / 2, "slow", "#c44e52"),
                (width / 2, "fast", "#4c72b0"),
            ):
                value = _v(c.get(label, {}).get("p99_ms"))
                ax.bar(xi + dx, 0 if math.isnan(value) else value, width, color=color, alpha=0.85)
                if not math.isnan(value):
                    _annotate(ax, xi + dx, value, f"{value:,.0f}")
        ax.set_title("p99 latency of the slow and the fast nodes' turns, ms", fontsize=10)
        ax.legend(
            handles=[
                Patch(color="#c44e52", label="slow nodes"),
                Patch(color="#4c72b0", label="fast nodes"),
            ],
            fontsize=7,
        )
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    handles: list[Any] = [
        Patch(color=_COLORS["1 replica"], label="1 replica"),
        Patch(color=_COLORS["shared"], label="replicas sharing Redis"),
        Patch(color=_COLORS["private"], label="replicas on private stores"),
        Line2D([], [], marker="o", color="black", ls="", ms=4, label="p50"),
        Line2D([], [], marker="_", color="black", ls="", ms=12, mew=2, label="p90"),
        Line2D([], [], marker="v", color="black", ls="", ms=5, label="p99"),
    ]
    axes[2].legend(handles=handles, fontsize=7, loc="upper left")
    w = result["workload"] if name != "engines" else scenario["workload"]
    fig.suptitle(
        f"{_TITLES.get(name, name)}: {w['conversations']} chats of {w['min_turns']}-"
        f"{w['max_turns']} turns sharing {w['prompts']} system prompts, "
        f"{scenario['rate_rps']:.2f} turns/s ({scenario['load']:.0%} of cold capacity); "
        f"medians of {len(rows[0]['runs'])} runs",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out / FILES[name], dpi=110)
    plt.close(fig)
    return FILES[name]


def write_cache_charts(result: dict[str, Any], out: Path) -> list[str]:
    """A PNG per scenario; returns the file names written (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed (pip install -e '.[bench]'): no charts")
        return []
    scenarios = result.get("scenarios", {})
    return [
        _chart(plt, name, result, out)
        for name in FILES
        if name in scenarios and scenarios[name].get("comparison")
    ]
