"""deploy/grafana/fleetgate.json against a running fleet: every metric its PromQL expressions
query is exported by a live gateway replica (two workers on a real Redis, after some traffic)
or health-checker, and the core ones have samples; with ``promtool`` on PATH (Debian's
``prometheus`` package), every expression and deploy/prometheus.yml pass Prometheus' own
checks."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support import MODEL
from tests.support.compose import DASHBOARD, PROMETHEUS_YML
from tests.support.polling import wait_until
from tests.support.processes import Checker, Gateway, Process, SimNode
from tests.support.prometheus import (
    GRAFANA_VARIABLES,
    dashboard_expressions,
    families,
    family_of,
    metric_names,
    samples,
)

# Produced by the traffic below, so they must have samples, not only a family.
SAMPLED = {
    "fleetgate_requests_total",
    "fleetgate_request_duration_seconds_bucket",
    "fleetgate_time_to_first_byte_seconds_bucket",
    "fleetgate_upstream_attempts_total",
    "fleetgate_in_flight_total",
    "fleetgate_nodes",
    "fleetgate_degraded",
    "fleetgate_workers",
    "fleetgate_checker_leader",
    "fleetgate_checker_probes_total",
    "fleetgate_checker_rounds_total",
    "fleetgate_checker_live_replicas",
}


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(a_seconds_bucket{x=~"$r", '
        'y="b_total"}[$__rate_interval]))) / ignoring(le) group_left max(c:rate5m offset 5m) '
        "> bool 1e3 and on(instance) d_total"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "c:rate5m", "d_total"}


def test_every_metric_the_dashboard_queries_is_exported(
    redis_url: str, procs: list[Process]
) -> None:
    names = set().union(*(metric_names(e) for e in dashboard_expressions(DASHBOARD)))
    assert len(names) > 20 and all(n.startswith("fleetgate_") for n in names), sorted(names)
    assert SAMPLED <= names

    node = SimNode("--tokens-per-s", "inf", name="dashboard-node")
    procs.append(node)
    gateway = Gateway("--workers", "2", "--redis-url", redis_url, "--node", node.url)
    procs.append(gateway)
    gateway.wait_models(MODEL)
    checker = Checker(redis_url, "dashboard-checker")
    procs.append(checker)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    no_reuse = httpx.Limits(max_keepalive_connections=0)  # reaches both workers
    with httpx.Client(base_url=gateway.url, timeout=20, limits=no_reuse) as http:
        for _ in range(20):
            assert http.post("/v1/chat/completions", json=chat).status_code == 200
        with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
            assert b"[DONE]" in s.read()
        unknown = http.post("/v1/chat/completions", json={**chat, "model": "no-such-model"})
        assert unknown.status_code == 404
    assert wait_until(
        lambda: checker.leads() and checker.metric("fleetgate_checker_rounds_total") >= 2, 10
    )

    texts = [
        httpx.get(f"{gateway.url}/metrics", timeout=10).text,
        httpx.get(f"http://127.0.0.1:{checker.metrics_port}/metrics", timeout=10).text,
    ]
    kinds: dict[str, str] = {}
    sampled: set[str] = set()
    for text in texts:
        kinds |= families(text)
        sampled |= {name for name, _ in samples(text)}
    missing = sorted(n for n in names if family_of(n, kinds) is None)
    assert not missing, f"the dashboard queries metrics nothing exports: {missing}"
    assert SAMPLED <= sampled, sorted(SAMPLED - sampled)


def test_prometheus_accepts_the_expressions_and_the_config(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    rules = []
    for index, expr in enumerate(dashboard_expressions(DASHBOARD, GRAFANA_VARIABLES)):
        rules.append({"record": f"dashboard:panel_{index}", "expr": expr})
    path = tmp_path / "rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    for command in (["check", "rules", str(path)], ["check", "config", str(PROMETHEUS_YML)]):
        done = subprocess.run(
            [promtool, *command], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
