"""Fleet-wide admission of fleetgate under overload: no node runs more than its max_inflight,
high-priority requests keep their time to first token, client keys of equal share get equal
throughput, a freed slot is taken again at once, and no request is lost; against the same load
without admission.

Why: a node's ``max_inflight`` caps the requests it runs at once over every gateway replica;
when every node is full a request waits in one queue per model in Redis (strict priority, then
weighted fair shares between client keys, then arrival), and a released slot goes to the head
of that queue in the same atomic step that leases it. This script measures what that does.

Everything runs as subprocesses on free loopback ports: a throwaway ``redis-server``, simulated
nodes (``python -m gateway.sim.node``, ``--slots`` equal to their capacity) and gateway
replicas (``python -m gateway``) sharing Redis; nodes and client keys are registered with the
ops CLI (``fleetgate nodes add URL --model M --max-inflight N``, ``fleetgate keys add NAME
--key SECRET --share 1``), as an operator does.

Scenario (scripts/bench/admission_workload.py): 4 nodes of 4 slots decoding 50 tokens/s,
answers of 16 to 32 tokens (uniform): 16 requests at once, about 33 answers/s. 2 replicas.
Two client keys of share 1: key a runs 4N closed loops and key b N (``--clients``, 8), each
sending its next request as soon as the last ended, for ``--duration`` s (60): 40 requests
outstanding, 2.5x the fleet's slots, so that both keys always have requests waiting. A third
key sends ``x-fleetgate-priority: high`` requests, streamed, open-loop Poisson at 5% of the
capacity; in each run the same stream first runs alone on the idle fleet (the TTFT baseline).
Set-ups (``--setups``): ``admission`` (the nodes registered with ``--max-inflight``, gateways
with ``--priority-reserve --reserve``, 0.25: one slot of four kept for high priority; the
gateway's default 0.1 keeps none of four), ``none`` (the same nodes without --max-inflight:
today's behaviour), and optionally ``default-reserve`` (admission with the default reserve).

Targets, judged on ``admission``; each a median over ``--runs`` (3) runs, ratios per run
against the idle fleet of the same run (printed with pass or FAIL; the exit status is 0 either
way, non-zero only when something failed to start): no node ever runs more than its
max_inflight (its own ``peak``); high-priority p90 TTFT within 1.5x of the idle fleet's; the
two keys' answers/s within 10% of each other while both are backlogged; a freed slot that
waiting requests may take idle less than 10 ms at p99 (the nodes' ``idle_gaps``); every request
answered (200) or refused with 429/503 carrying Retry-After, none lost (a client timeout of
``--client-timeout`` s, 60, counts as lost).

Outputs: tables and one JSON line on stdout (progress on stderr) and, in ``--out`` (default
docs/benchmarks; nothing with ``--quick`` unless ``--out`` is given): admission.json (every
run), admission.md and admission.png (matplotlib: ``pip install -e ".[bench]"``). About 10
minutes on 2 cores; ``--quick`` (1 run of 6 s) well under one. ``--replot admission.json``
redraws the chart and admission.md.

    python scripts/bench_admission.py [--quick] [--runs 3] [--duration 60] [--clients 8]
                                      [--setups admission,none] [--seed 1] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, Python puts scripts/ on sys.path, not the repository root above it that holds
# the scripts package: add the root, so that scripts.bench imports from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench.admission_main import admission_main


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with ``argv``; the exit status."""
    return admission_main(__doc__ or "", argv)


if __name__ == "__main__":
    sys.exit(main())
