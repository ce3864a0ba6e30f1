"""The engine scenario's chart (engines.png, with matplotlib when it is installed): latency,
time to first token and prefix hit rate by strategy, on real llama-servers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from scripts.bench.harness import progress

_SHARED = "#55a868"
_ONE = "#4c72b0"
_ENGINES = "#dd8452"


def _v(value: float | None) -> float:
    """A figure as saved (None where it was NaN) as a float, NaN for None."""
    return math.nan if value is None else float(value)


def _label(row: dict[str, Any]) -> str:
    return str(row["strategy"]).replace("_", "_\n") + f"\n({row['mode']})"


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
    x = list(range(len(rows)))
    colors = [_ONE if r["replicas"] == 1 else _SHARED for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.6), gridspec_kw={"width_ratios": [4, 4, 3]})
    for ax, figures, title, ylabel in (
        (
            axes[0],
            ("mean_ms", "p50_ms", "p90_ms", "p99_ms"),
            "Latency, send to last byte (bar: mean)",
            "ms",
        ),
        (
            axes[1],
            ("ttft_p50_ms", None, "ttft_p90_ms", None),
            "Time to first token of streams (bar: p50)",
            "ms",
        ),
    ):
        bar, p50, p90, p99 = figures
        for xi, row, color in zip(x, rows, colors, strict=True):
            m = row["median"]
            height = _v(m[bar])
            ax.bar(xi, 0 if math.isnan(height) else height, color=color, alpha=0.85, width=0.7)
            if not math.isnan(height):
                ax.annotate(
                    f"{height:,.0f}",
                    (xi, height),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 1),
                    textcoords="offset points",
                )
            marks = [(p50, "o", 4), (p90, "_", 12), (p99, "v", 5)]
            for key, marker, size in marks:
                if key is not None and not math.isnan(_v(m[key])):
                    ax.plot(xi, _v(m[key]), marker, color="black", ms=size, mew=2)
        ax.set_xticks(x, [_label(r) for r in rows], fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    handles: list[Any] = [
        Patch(color=_SHARED, label=f"{result['engine_replicas']} replicas sharing Redis"),
        Patch(color=_ONE, label="1 replica"),
        Line2D([], [], marker="o", color="black", ls="", ms=4, label="p50"),
        Line2D([], [], marker="_", color="black", ls="", ms=12, mew=2, label="p90"),
        Line2D([], [], marker="v", color="black", ls="", ms=5, label="p99"),
    ]
    axes[0].legend(handles=handles, fontsize=7, loc="upper right")
    ax = axes[2]
    width = 0.38
    for xi, row, color in zip(x, rows, colors, strict=True):
        m = row["median"]
        usage, engines = _v(m["hit_rate"]), _v(m["engine_hit_rate"])
        ax.bar(xi - width / 2, 0 if math.isnan(usage) else usage, width, color=color, alpha=0.85)
        ax.bar(
            xi + width / 2, 0 if math.isnan(engines) else engines, width, color=_ENGINES, alpha=0.85
        )
        if not math.isnan(usage):
            ax.annotate(
                f"{usage:.0%}",
                (xi - width / 2, usage),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 1),
                textcoords="offset points",
            )
    ax.set_xticks(x, [_label(r) for r in rows], fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_title("Prefix hit rate (cached / prompt tokens)", fontsize=10)
    ax.legend(
        handles=[
            Patch(color=_SHARED, label="usage.cached_tokens, measured window"),
            Patch(color=_ENGINES, label="engines' counters, whole run"),
        ],
        fontsize=7,
        loc="lower right",
    )
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"Real llama-server engines (not simulated): {len(result['engines'])} x "
        f"{result['model']}, multi-turn chats sharing {result['workload']['prompts']} system "
        f"prompts, {result['rate_rps']:.2f} turns/s ({result['load']:.0%} of cold capacity); "
        f"medians of {result['runs']} runs",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out / "engines.png", dpi=110)
    plt.close(fig)
    return ["engines.png"]
