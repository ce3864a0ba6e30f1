"""admission.md: the admission benchmark's figures as a Markdown page (scripts/bench_admission.py),
with how, when and where they were measured and what each figure counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scripts.bench.admission_report import (
    busy,
    describe,
    latency_rows,
    phases,
    request_rows,
    target_rows,
)
from scripts.bench.tables import md_table

EXPLAINED = [
    "Figures: sent, answered and refused count whole runs (medians of the runs; lost: all runs "
    "added up). A request is answered (200 and a whole answer of the length it asked), refused "
    "(429 or 503 carrying Retry-After; a refused loop waits that long) or lost (anything "
    "else, a client timeout included). Answers/s count the answers that ended in the "
    "backlogged window; queued: the share of a key's answers whose receipt "
    "(`x-fleetgate-route`) carries `queued_ms`. TTFT: send to the first content chunk. Queue "
    "wait: the receipts' `queued_ms` of the normal-priority answers sent in the window (0 "
    "when admitted at once; without admission nothing waits at the gateways, requests wait in "
    "the nodes' own queues instead); high queued: the same of the high-priority ones; queue "
    "depth: the requests waiting in the fleet's queue, the replicas' `fleetgate_queue_depth` "
    "added up, sampled each second in the window, their mean. Peaks: the most "
    "requests a node held at once (`/sim/stats` `peak`, running and waiting in its own queue), "
    "the highest of the runs.",
    "",
    "Idle gaps: each node records, when a request takes a slot, how long that slot stood idle "
    "since a request ended on it (the slot freed last; a request already waiting on the node "
    "takes it at once: 0 ms). The gaps counted are those of the backlogged window whose slot "
    "waiting requests could take: the arrival found fewer requests running than normal "
    "priority may fill. A slot kept for high priority idles by design until a high-priority "
    "request comes; the gaps of every slot are shown too (p99 all slots). What a gap spans "
    "with admission: the node's answer reaches its replica, which relays it to the client, "
    "then releases the lease and admits the queue's head in one pipelined write (`release.lua` "
    "then `admit.lua`, one round trip), which publishes the admission; a request waiting on "
    "that replica goes on at once, one waiting on another replica when that replica hears the "
    "publication; either forwards the request to the node. Each run's gap p99 is in "
    "admission.json with the machine's load average (`loadavg_1m`).",
    "",
    'Set-ups: "admission" registers the nodes with their `--max-inflight`; "no admission" '
    "registers the same nodes without it (today's behaviour: each node queues what it is "
    "sent). With the gateway's default `--priority-reserve` of 0.1, a node of 4 slots keeps "
    "none for high priority (floor(4 x 0.1) = 0), so the judged set-up keeps one "
    "(`--priority-reserve 0.25`); `--setups admission,default-reserve,none` also runs the "
    "default. Why more than 2x the slots: key b must exceed its fair share of the slots "
    "normal priority may fill, or it would not be backlogged.",
]


def write_admission_markdown(result: dict[str, Any], out: Path, charts: list[str]) -> None:
    """Write ``out``/admission.md: the scenario, the tables, the targets and the charts."""
    m = result["machine"]
    lines = [
        "# Fleet-wide admission benchmark",
        "",
        f"Measured on {result['date']} by `{result['command']}` in "
        f"{result['elapsed_s'] / 60:.1f} minutes ({m['cpus']} CPUs, {m['cpu_model']}, Python "
        f"{m['python']}; the machine's 1-minute load average after the phases: {busy(result)}, "
        "shared with other work). Raw figures of every run: [admission.json](admission.json). "
        'Regenerate with `pip install -e ".[bench]"` and `python scripts/bench_admission.py` '
        "(`--quick` for a smoke run that writes nothing; `--replot "
        "docs/benchmarks/admission.json` redraws the chart and this page). Every figure "
        "comes from simulated nodes.",
        "",
        "## Scenario",
        "",
        describe(result),
        "",
        *EXPLAINED,
        "",
        "## Requests and throughput",
        "",
        md_table(*request_rows(result), left=1),
        "",
        "## Latency, nodes and idle slots",
        "",
        "Milliseconds; medians of the runs.",
        "",
        md_table(*latency_rows(result), left=1),
        "",
    ]
    notes = [
        f"- {row['label']}: {row['log_findings_count']} warning/error line(s) in the replicas' "
        f"logs, e.g. `{row['log_findings'][0][:240]}`"
        for row in phases(result).values()
        if row.get("log_findings_count")
    ]
    notes += [
        f"- {row['label']}: lost {row['median']['lost_kinds_total']}"
        for row in phases(result).values()
        if row["median"].get("lost_kinds_total")
    ]
    if notes:
        lines += ["What the processes logged and what was lost:", "", *notes, ""]
    if result.get("targets"):
        lines += [
            "## Targets",
            "",
            "Judged on the set-up with admission; the other set-ups' figures are shown beside "
            "it, not judged. Ratios are computed run by run against the idle fleet of the same "
            "run, then their median taken.",
            "",
            md_table(*target_rows(result), left=1),
            "",
        ]
    if charts:
        lines += ["## Charts", "", *(f"![{c}]({c})" for c in charts), ""]
    (out / "admission.md").write_text("\n".join(lines))
