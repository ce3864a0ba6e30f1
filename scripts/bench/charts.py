"""The routing benchmark's charts (PNG, with matplotlib when it is installed): latency and
node shares by set-up, cost by fleet size, and the node drill's timeline."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from scripts.bench.harness import progress
from scripts.bench.scale import FULL_SCAN_LIMIT
from scripts.bench.scenario import LATENCY_STRATEGIES


def _wrap(name: str) -> str:
    """A strategy name with a line break after each underscore, for chart labels."""
    return name.replace("_", "_\n")


_COLORS = {"1 replica": "#4c72b0", "4 shared": "#55a868", "4 private": "#c44e52"}


def write_charts(result: dict[str, Any], out: Path) -> list[str]:
    """PNG charts; returns their file names (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed (pip install -e '.[bench]'): no charts")
        return []
    charts = [
        ("latency.png", _latency_chart),
        ("shares.png", _shares_chart),
        ("scale.png", _scale_chart),
        ("drill.png", _drill_chart),
    ]
    written: list[str] = []
    for name, draw in charts:
        fig = draw(plt, result)
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _latency_chart(plt: Any, result: dict[str, Any]) -> Any:
    """Mean and p50/p90/p99 latency by strategy, then by replica set-up."""
    if "comparison" not in result:
        return None
    comp = result["comparison"]
    shared_rows = [r for r in comp.values() if r["mode"] == "4 shared"]
    setup_rows = [r for r in comp.values() if r["strategy"] in LATENCY_STRATEGIES]
    groups = [("Strategies, 4 replicas sharing Redis", shared_rows)]
    groups += [("Replica set-ups", setup_rows)]
    p99s = sorted(r["median"]["p99_ms"] for r in comp.values())
    # Outliers (round_robin) would flatten everything else: clip them, and say so.
    cap = min(p99s[-1], 3 * statistics.median(p99s)) * 1.12
    widths = [len(rows) + (len(rows) // 3 - 1 if i else 0) for i, (_t, rows) in enumerate(groups)]
    fig, axes = plt.subplots(
        1, len(groups), figsize=(13, 5.4), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    for ax, (title, rows) in zip(axes[0], groups, strict=True):
        by_group = title.startswith("Replica")
        x = [i + (i // 3 if by_group else 0) for i in range(len(rows))]
        for xi, r in zip(x, rows, strict=True):
            m = r["median"]
            ax.bar(xi, min(m["mean_ms"], cap), color=_COLORS[r["mode"]], alpha=0.85, width=0.7)
            ax.plot([xi, xi], [m["p50_ms"], min(m["p99_ms"], cap)], color="black", lw=1)
            ax.plot(xi, m["p50_ms"], "o", color="black", ms=4)
            if m["p90_ms"] <= cap:
                ax.plot(xi, m["p90_ms"], "_", color="black", ms=12, mew=2)
            if m["p99_ms"] <= cap:
                ax.plot(xi, m["p99_ms"], "v", color="black", ms=5)
            else:
                ax.plot(xi, cap, "^", color="black", ms=6, clip_on=False)
                ax.annotate(
                    f"p99 {m['p99_ms']:.0f}"
                    + (f"\np90 {m['p90_ms']:.0f}" if m["p90_ms"] > cap else ""),
                    (xi, cap),
                    ha="left",
                    va="top",
                    fontsize=7,
                    xytext=(5, -3),
                    textcoords="offset points",
                )
            if m["mean_ms"] <= cap:
                ax.annotate(
                    f"{m['mean_ms']:.0f}",
                    (xi, m["mean_ms"]),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(10, 1),
                    textcoords="offset points",
                )
            else:
                ax.text(
                    xi,
                    cap * 0.9,
                    f"mean\n{m['mean_ms']:.0f}",
                    ha="center",
                    va="top",
                    fontsize=7,
                    color="white",
                    fontweight="bold",
                )
        if by_group:
            ax.set_xticks(x, [r["mode"] for r in rows], fontsize=8)
            for g in range(0, len(rows), 3):
                center = sum(x[g : g + 3]) / len(x[g : g + 3])
                ax.text(
                    center,
                    -0.09,
                    rows[g]["strategy"],
                    ha="center",
                    va="top",
                    fontsize=9,
                    transform=ax.get_xaxis_transform(),
                )
        else:
            ax.set_xticks(x, [_wrap(r["strategy"]) for r in rows], fontsize=8)
        ax.set_ylim(0, cap)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes = axes[0]
    axes[0].set_ylabel("latency to last byte, ms")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(color=c, label=f"mean, {k}") for k, c in _COLORS.items()]
    handles += [
        Line2D([], [], marker="o", color="black", ls="", ms=4, label="p50"),
        Line2D([], [], marker="_", color="black", ls="", ms=12, mew=2, label="p90"),
        Line2D([], [], marker="v", color="black", ls="", ms=5, label="p99"),
    ]
    axes[1].legend(handles=handles, fontsize=8, loc="upper left")
    sc = result["scenario"]
    fig.suptitle(
        f"Latency at {sc['load']:.0%} load ({sc['rate_rps']:.1f} req/s) on unequal nodes, "
        f"medians of {result['runs']} runs",
        fontsize=11,
    )
    return fig


def _shares_chart(plt: Any, result: dict[str, Any]) -> Any:
    """Each node's share of the answers by strategy and set-up, under its share of capacity."""
    if "comparison" not in result:
        return None
    comp = result["comparison"]
    sc = result["scenario"]
    names = [n["name"] for n in sc["nodes"]]
    palette = ["#1f77b4", "#6baed6", "#ff7f0e", "#fdae6b", "#2ca02c", "#98df8a"]
    rows = [("capacity", {n["name"]: n["capacity_share"] for n in sc["nodes"]})]
    rows += [(f"{r['strategy']} / {r['mode']}", r["median"]["shares"]) for r in comp.values()]
    rows.reverse()
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.4))
    for y, (_label, shares) in enumerate(rows):
        left = 0.0
        for j, name in enumerate(names):
            w = shares.get(name, 0.0)
            ax.barh(
                y,
                w,
                left=left,
                color=palette[j % len(palette)],
                label=name if y == 0 else None,
                edgecolor="white",
            )
            if w >= 0.06:
                ax.text(left + w / 2, y, f"{w:.0%}", ha="center", va="center", fontsize=8)
            left += w
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of answered requests")
    ax.set_title("Each node's share by strategy and set-up (top: share of capacity)", fontsize=10)
    ax.legend(ncol=len(names), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.06))
    return fig


def _scale_chart(plt: Any, result: dict[str, Any]) -> Any:
    """Gateway and Redis CPU per request by registered nodes."""
    if "scale" not in result:
        return None
    sizes = result["scale"]["sizes"]
    xs = [int(s) for s in sizes]
    med = [sizes[s]["median"] for s in sizes]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [
        (axes[0], "gateway_cpu_ms_per_req", "gateway CPU per request, ms", "#4c72b0"),
        (axes[1], "redis_cpu_us_per_req", "Redis CPU per request, us", "#c44e52"),
    ]
    for ax, key, label, color in series:
        for s, row in zip(xs, sizes.values(), strict=True):
            ax.plot(
                [s] * len(row["runs"]),
                [r[key] for r in row["runs"]],
                ".",
                color=color,
                alpha=0.35,
            )
        ax.plot(xs, [m[key] for m in med], "o-", color=color, label="median")
        ax.axvline(FULL_SCAN_LIMIT, ls=":", color="gray")
        ax.text(
            FULL_SCAN_LIMIT * 1.05,
            0.05,
            "sampling\nbeyond 32",
            fontsize=8,
            color="gray",
            transform=ax.get_xaxis_transform(),
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(0, max(m[key] for m in med) * 1.4)
        ax.set_xlabel("registered nodes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].plot(
        xs,
        [m["script_us_per_call"] for m in med],
        "s--",
        color="#8172b2",
        label="server time per script call, us",
    )
    axes[1].legend(fontsize=8)
    fig.suptitle(
        f"Cost per request by fleet size (1 replica, {result['scale']['rate_rps']:g} req/s)",
        fontsize=11,
    )
    return fig


def _drill_chart(plt: Any, result: dict[str, Any]) -> Any:
    """Latency of each request over the node drill, the kill and who tried the dead node."""
    drills = result.get("drills", {})
    panels = [
        (k, t)
        for k, t in (
            ("node_kill_shared", "4 replicas sharing Redis + checker"),
            ("node_kill_private", "4 private replicas"),
        )
        if k in drills
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 4.2), sharey=True, squeeze=False
    )
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        d = drills[key]
        ok = [(p[0], p[1]) for p in d["points"] if p[1] is not None]
        bad = [p[0] for p in d["points"] if p[1] is None]
        ax.plot(
            [p[0] for p in ok], [p[1] for p in ok], ".", ms=3, color="#4c72b0", label="answered"
        )
        if bad:
            top_y: float = max((p[1] for p in ok), default=1.0)
            ax.plot(bad, [top_y] * len(bad), "x", color="#c44e52", label="failed")
        ax.axvline(d["kill_at_s"], color="black", ls="--", lw=1, label="kill -9 node")
        low = min((p[1] for p in ok), default=100.0) * 0.7
        ticks = d.get("attempt_events", [])
        if ticks:
            ax.plot(
                [e[0] for e in ticks],
                [low] * len(ticks),
                "|",
                color="#dd8452",
                ms=16,
                mew=2,
                label="a replica tried the dead node",
            )
        unhealthy = d.get("unhealthy_after_s")
        if unhealthy is not None and not math.isnan(unhealthy):
            ax.axvline(
                d["kill_at_s"] + unhealthy,
                color="gray",
                ls=":",
                lw=1,
                label="checker: unhealthy",
            )
        ax.set_yscale("log")
        # Room above the points for the legend.
        ax.set_ylim(low * 0.8, max((p[1] for p in ok), default=1000.0) * 6)
        ax.set_xlabel("arrival time, s")
        ax.set_title(f"{title}: {d['failed']} failed", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0][0].set_ylabel("latency, ms (log)")
    fig.suptitle(
        f"Failure drill: kill -9 one node mid-run ({drills[panels[0][0]]['load']:.0%} load)",
        fontsize=11,
    )
    return fig
