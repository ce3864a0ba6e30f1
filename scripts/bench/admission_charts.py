"""The admission benchmark's chart (admission.png, with matplotlib when it is installed): each
key's answers/s over time, high-priority TTFT, the nodes' peaks and the idle gaps, by set-up."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from scripts.bench.admission_figures import BIN_S
from scripts.bench.admission_report import phases
from scripts.bench.harness import progress

FILE = "admission.png"
COLORS = {"idle": "#8c8c8c", "admission": "#55a868", "default-reserve": "#4c72b0"}
OTHER = "#c44e52"


def _color(key: str) -> str:
    return COLORS.get(key, OTHER)


def _v(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _throughput(ax: Any, result: dict[str, Any]) -> None:
    s = result["scenario"]
    for key, row in result["setups"].items():
        for k, style in (("a", "-"), ("b", "--")):
            values = row["median"]["series"].get(k, [])
            times = [(i + 0.5) * BIN_S for i in range(len(values))]
            ax.plot(times, values, style, color=_color(key), label=f"{row['label']}: key {k}")
    ax.axvspan(s["warmup_s"], s["duration_s"], color="#eeeeee", zorder=0)
    ax.set_xlabel("s after the start (grey: the backlogged window)")
    ax.set_title(f"Answers/s per key ({BIN_S:g} s bins; key a runs 4x the loops)", fontsize=10)
    ax.legend(fontsize=7)


def _bars(ax: Any, rows: dict[str, dict[str, Any]], bar: str, marks: list[tuple[str, str]]) -> None:
    for x, (key, row) in enumerate(rows.items()):
        m = row["median"]
        height = _v(m[bar])
        ax.bar(x, 0 if math.isnan(height) else height, color=_color(key), alpha=0.85, width=0.6)
        if not math.isnan(height):
            ax.annotate(
                f"{height:,.1f}" if height < 10 else f"{height:,.0f}",
                (x, height),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        for k, marker in marks:
            if not math.isnan(_v(m[k])):
                ax.plot(x, _v(m[k]), marker, color="black", ms=10, mew=2)
    ax.set_xticks(range(len(rows)), [r["label"].replace(" (", "\n(") for r in rows.values()])
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="y", alpha=0.3)


def _peaks(ax: Any, result: dict[str, Any]) -> None:
    rows = phases(result)
    names = sorted({n for row in rows.values() for r in row["runs"] for n in r["peaks"]})
    width = 0.8 / max(1, len(rows))
    for i, (key, row) in enumerate(rows.items()):
        peaks = [max((r["peaks"].get(n, 0) for r in row["runs"]), default=0) for n in names]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, peaks, width, color=_color(key), label=row["label"])
    cap = result["scenario"]["max_inflight"]
    ax.axhline(cap, color="black", ls=":", lw=1, label=f"max_inflight {cap}")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_title("Most requests a node held at once (its own count)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def write_admission_chart(result: dict[str, Any], out: Path) -> list[str]:
    """admission.png in ``out``; the file names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed (pip install -e '.[bench]'): no chart")
        return []
    if not result.get("setups"):
        return []
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    _throughput(axes[0][0], result)
    ax = axes[0][1]
    _bars(ax, phases(result), "high_ttft_p50_ms", [("high_ttft_p90_ms", "_")])
    idle = _v(result["idle"]["median"]["high_ttft_p90_ms"]) if result.get("idle") else math.nan
    if not math.isnan(idle):
        ax.axhline(1.5 * idle, color="black", ls=":", lw=1, label="1.5x the idle fleet's p90")
        ax.legend(fontsize=7)
    ax.set_yscale("log")
    ax.set_title("High-priority TTFT, ms (bar: p50; - p90; log scale)", fontsize=10)
    _peaks(axes[1][0], result)
    ax = axes[1][1]
    _bars(ax, result["setups"], "open_gap_p50_ms", [("open_gap_p99_ms", "_"), ("gap_p99_ms", "x")])
    ax.axhline(10.0, color="black", ls=":", lw=1, label="10 ms")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title(
        "Freed slot idle before taken, ms (bar: p50; - p99; x p99 with reserved slots)",
        fontsize=10,
    )
    ax.legend(fontsize=7)
    s = result["scenario"]
    fig.suptitle(
        f"Fleet-wide admission: {s['nodes']} nodes x {s['max_inflight']} slots, "
        f"{sum(s['loops'].values())} client loops (key a {s['loops']['a']}, key b "
        f"{s['loops']['b']}) and {s['high_rate_rps']:.2f}/s high priority over "
        f"{s['replicas']} replicas; medians of {result['runs']} run(s)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out / FILE, dpi=110)
    plt.close(fig)
    return [FILE]
