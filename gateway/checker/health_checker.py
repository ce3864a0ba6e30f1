"""``fleetgate health-checker``: probes every node, moves nodes between active and unhealthy
with fall/rise thresholds, deregisters nodes unhealthy for too long, scrapes KV-cache load for
``min_cache_usage``, and sweeps expired leases.

Several may run: one leads through a Redis lease with a fencing token; every write carries the
token, so a leader that was paused and lost its lease cannot overwrite its successor.

Nothing a node hash holds and no store error ends the process: a failure while probing or
reporting one node is that node's (logged once per node and kind, counted), and a round the
store fails is counted, logged once per streak and retried at the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.common import tracing
from gateway.common.config import (
    ConfigError,
    Option,
    int_range,
    non_empty,
    port,
    positive_float,
    process_id,
    resolve,
    setup_logging,
)
from gateway.common.metrics import Counter, Gauge, render_text
from gateway.common.pd_cleanup import DistServeMetrics, PDCleaner
from shared_state import (
    Fenced,
    InvalidInput,
    Node,
    NodeState,
    PDState,
    Store,
    StoreUnavailable,
)
from shared_state.health import HealthLedger
from shared_state.model import HealthReport, ProbeResult
from shared_state.registry import validate_models

from .probes import Finding, Load, Prober

log = logging.getLogger("fleetgate.checker")

PROBE_KINDS = frozenset({"health", "models", "generate", "metrics"})


def _kinds(text: str) -> frozenset[str]:
    kinds = frozenset(k.strip() for k in text.split(",") if k.strip())
    unknown = kinds - PROBE_KINDS
    if unknown or not kinds:
        raise ValueError(f"probe kinds are {', '.join(sorted(PROBE_KINDS))}; got {text!r}")
    return kinds


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {text!r}")
    return value


OPTIONS: tuple[Option, ...] = (
    Option("redis-url", non_empty, None, "Redis URL of the fleet's shared state (required)"),
    Option("prefix", non_empty, "fleetgate", "key prefix (hash tag) in Redis"),
    Option("interval", positive_float, 5.0, "seconds between probe rounds (jittered +-10%)"),
    Option("timeout", positive_float, 2.0, "timeout of each probe, s"),
    Option("fall", int_range(1, 100), 3, "failed rounds before a node is unhealthy"),
    Option("rise", int_range(1, 100), 2, "passed rounds before an unhealthy node is active"),
    Option("deregister-after", _non_negative, 300.0, "seconds unhealthy before removal; 0 never"),
    Option("probes", _kinds, PROBE_KINDS, "probe kinds: health,models,generate,metrics"),
    Option("models-every", int_range(1, 10_000), 12, "rounds between /v1/models probes"),
    Option(
        "generate-every",
        _non_negative,
        60.0,
        "seconds between generation probes (also run at once after gateways report failures)",
    ),
    Option("lease-seconds", positive_float, 10.0, "leader lease; a standby takes over after it"),
    Option(
        "replica-alive-seconds",
        positive_float,
        45.0,
        "a gateway replica is alive if it renewed its leases within this time",
    ),
    Option("metrics-port", port, None, "serve /metrics and /health on this port"),
    Option("metrics-host", non_empty, "127.0.0.1", "address of the metrics server"),
    Option("checker-id", non_empty, None, "this checker's id (default: host-random)"),
    Option("log-level", non_empty, "info", "log level"),
)


@dataclass(frozen=True, slots=True)
class CheckerSettings:
    redis_url: str | None = None
    prefix: str = "fleetgate"
    interval: float = 5.0
    timeout: float = 2.0
    fall: int = 3
    rise: int = 2
    deregister_after: float = 300.0
    probes: frozenset[str] = PROBE_KINDS
    models_every: int = 12
    generate_every: float = 60.0
    lease_seconds: float = 10.0
    replica_alive_seconds: float = 45.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    checker_id: str | None = None
    log_level: str = "info"

    def identity(self) -> str:
        if self.checker_id:
            return self.checker_id.replace(" ", "-")
        return process_id()


def load_settings(argv: Sequence[str] | None = None) -> CheckerSettings:
    values = resolve(
        "fleetgate health-checker",
        "Probe nodes and keep their health in the store.",
        OPTIONS,
        argv,
    )
    settings = CheckerSettings(**values)
    if settings.redis_url is None:
        raise ConfigError("--redis-url is required: the checker shares state with the gateways")
    return settings


class CheckerMetrics:
    def __init__(self) -> None:
        self.probes = Counter("fleetgate_checker_probes_total", "Probes by kind and result.")
        self.transitions = Counter(
            "fleetgate_checker_transitions_total", "Node state changes made, by new state."
        )
        self.deregistrations = Counter(
            "fleetgate_checker_deregistrations_total", "Nodes removed after being unhealthy."
        )
        self.fenced = Counter(
            "fleetgate_checker_fenced_writes_total",
            "Writes rejected: this checker had lost the lead.",
        )
        self.swept = Counter("fleetgate_checker_swept_leases_total", "Expired leases removed.")
        self.leader = Gauge("fleetgate_checker_leader", "1 while this checker leads.")
        self.nodes = Gauge("fleetgate_checker_nodes", "Nodes by state, last round.")
        self.replicas = Gauge(
            "fleetgate_checker_live_replicas", "Gateway replicas renewing leases."
        )
        self.rounds = Counter("fleetgate_checker_rounds_total", "Probe rounds completed.")
        self.node_errors = Counter(
            "fleetgate_checker_node_errors_total",
            "Failures while probing or reporting one node, by stage (probe, report).",
        )
        self.store_errors = Counter(
            "fleetgate_checker_store_errors_total",
            "Rounds or leader-lease calls the store failed (retried), by operation and error.",
        )
        self.extra: list[Counter] = []

    def render(self) -> bytes:
        lines = render_text(
            (
                self.probes,
                self.transitions,
                self.deregistrations,
                self.fenced,
                self.swept,
                self.leader,
                self.nodes,
                self.replicas,
                self.rounds,
                self.node_errors,
                self.store_errors,
                *self.extra,
            )
        )
        return ("\n".join(lines) + "\n").encode()


class HealthChecker:
    def __init__(
        self, settings: CheckerSettings, store: Store, rng: random.Random | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.id = settings.identity()
        self.ledger = HealthLedger(store, self.id)
        self.prober = Prober(settings.timeout)
        self.metrics = CheckerMetrics()
        # DistServe: a node that leaves takes its pairs and prefill sessions with it, and the
        # sessions of replicas that died are freed.
        self.pd = PDCleaner(PDState(store), self._call, DistServeMetrics())
        self.metrics.extra.extend(self.pd.metrics.counters())
        self.rng = rng or random.Random()
        self.token = 0
        self.rounds = 0
        self.live_replicas: dict[str, int] = {}
        self._seen_failures: dict[str, int] = {}
        self._last_generate: dict[str, float] = {}
        self._generate_failed: set[str] = set()
        # What was last logged of a node in trouble, and of the store per operation: each
        # failure is logged when it starts or changes, not every round.
        self._node_trouble: dict[str, tuple[str, int]] = {}  # node -> (trouble, round)
        self._store_trouble: dict[str, str] = {}

    async def _call(self, node: Node, path: str, body: Any) -> tuple[int, bytes]:
        headers = Prober.headers_of(node)
        if body is None:
            response = await self.prober.client_for(node).get(node.url + path, headers=headers)
        else:
            client = self.prober.client_for(node)
            response = await client.post(node.url + path, json=body, headers=headers)
        return response.status_code, response.content

    @property
    def leading(self) -> bool:
        return self.token > 0

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the lease and probe while leading, until ``stop`` is set."""
        lease = asyncio.get_running_loop().create_task(self._keep_lease(stop))
        try:
            while not stop.is_set():
                if self.leading:
                    try:
                        await self.probe_round()
                    except Fenced:
                        # Counted even when the lease task saw the loss first: the write
                        # was still attempted, and refused.
                        self.metrics.fenced.inc()
                        self._lost_lead("a write was fenced")
                    except Exception as exc:  # the store failed the round: retry at the next
                        self._store_failed("round", exc)
                    else:
                        self._store_ok("round")
                jitter = self.settings.interval * (0.9 + 0.2 * self.rng.random())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), jitter)
        finally:
            lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease
            if self.leading:
                # Not resigning only delays a standby by one lease time.
                with contextlib.suppress(Exception):
                    await self.ledger.resign()
            await self.prober.close()

    def _lost_lead(self, why: str) -> None:
        if self.leading:
            log.warning("checker %s stops leading: %s", self.id, why)
        self.token = 0
        self.metrics.leader.set((), 0)

    def _store_failed(self, operation: str, exc: Exception) -> None:
        """Count a store failure of ``operation``; log it when it starts or changes."""
        kind = type(exc).__name__
        self.metrics.store_errors.inc((("op", operation), ("error", kind)))
        if self._store_trouble.get(operation) != kind:
            self._store_trouble[operation] = kind
            log.warning("store failed the checker's %s (%s: %s); retrying", operation, kind, exc)

    def _store_ok(self, operation: str) -> None:
        if self._store_trouble.pop(operation, None) is not None:
            log.info("the checker's %s works again", operation)

    async def _keep_lease(self, stop: asyncio.Event) -> None:
        lease_ms = int(self.settings.lease_seconds * 1000)
        while not stop.is_set():
            try:
                token, holder = await self.ledger.lead(lease_ms)
            except Exception as exc:
                # Unable to renew, this checker cannot know it still leads: it stops writing
                # (its lease runs out for a standby) and asks again at the next renewal.
                self._store_failed("lease", exc)
                token, holder = 0, ""
            else:
                self._store_ok("lease")
            if token and token != self.token:
                log.info("checker %s leads (token %d)", self.id, token)
            elif not token and self.leading:
                self._lost_lead(f"{holder} holds the lease" if holder else "lease not renewed")
            self.token = token
            self.metrics.leader.set((), 1 if token else 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.lease_seconds / 3)

    async def probe_round(self) -> None:
        """Probe every registered node concurrently, then sweep expired leases; one span
        (tracing on), each node's probes a span in it."""
        with tracing.tracer().span("fleetgate.probe_round", {"fleetgate.checker": self.id}) as span:
            token = self.token
            registry = await self.store.registry()
            self.rounds += 1
            span.update({"fleetgate.round": self.rounds, "fleetgate.nodes": len(registry.nodes)})
            reports = await asyncio.gather(
                *(self._check_isolated(node, token) for node in registry.nodes)
            )
            alive_ms = int(self.settings.replica_alive_seconds * 1000)
            sweep = await self.ledger.sweep(token, [n.id for n in registry.nodes], alive_ms)
            self.live_replicas = sweep.live_replicas
            self.metrics.swept.inc((), sweep.pruned_leases)
            await self.pd.sweep()
            await self.pd.drop_departed({n.id for n in registry.nodes})
            self.metrics.replicas.set((), len(sweep.live_replicas))
            # Each report carries the node's state after it: no second read of the registry.
            states = dict.fromkeys((s.value for s in NodeState), 0)
            for report in reports:
                if report is not None and report.state in states:
                    states[report.state] += 1
            for state, count in states.items():
                self.metrics.nodes.set((("state", state),), count)
            self.metrics.rounds.inc()
            span.update(
                {
                    "fleetgate.swept_leases": sweep.pruned_leases,
                    "fleetgate.live_replicas": len(sweep.live_replicas),
                    **{f"fleetgate.nodes.{state}": count for state, count in states.items()},
                }
            )

    def _generation_due(self, node: Node) -> bool:
        if "generate" not in self.settings.probes:
            return False
        seen = self._seen_failures.get(node.id)
        self._seen_failures[node.id] = node.fail_total
        if seen is not None and node.fail_total > seen:
            return True  # gateways just reported failures: check generation now
        if node.state is NodeState.UNHEALTHY or node.id in self._generate_failed:
            return True  # recovery must include generating again
        every = self.settings.generate_every
        last = self._last_generate.get(node.id)
        return every > 0 and (last is None or time.monotonic() - last >= every)

    def _count(self, kind: str, finding: Finding) -> None:
        self.metrics.probes.inc((("kind", kind), ("result", "ok" if finding.ok else "fail")))

    async def _check_isolated(self, node: Node, token: int) -> HealthReport | None:
        """Probe and report one node; any failure but losing the lead or the store stays
        this node's: logged once per node and kind, counted, ``None`` returned."""
        try:
            report = await self._check(node, token)
        except (Fenced, StoreUnavailable):
            raise
        except Exception as exc:
            self._node_failed(node, "report", exc)
            return None
        trouble = self._node_trouble.get(node.id)
        if trouble is not None and trouble[1] < self.rounds:  # none this round
            del self._node_trouble[node.id]
            log.info("node %s is probed and reported again", node.id)
        return report

    def _node_failed(self, node: Node, stage: str, exc: Exception) -> None:
        self.metrics.node_errors.inc((("stage", stage),))
        trouble = f"{stage}: {type(exc).__name__}"
        logged = self._node_trouble.get(node.id)
        self._node_trouble[node.id] = (trouble, self.rounds)
        if logged is None or logged[0] != trouble:
            log.warning("node %s: %s failed (%s: %s)", node.id, stage, type(exc).__name__, exc)

    async def _probe(self, node: Node) -> tuple[ProbeResult, str, list[str] | None, Load | None]:
        """The probes due for ``node``: (result, reason, models, load); an unexpected error
        is a failed probe of this node, never of the round."""
        try:
            return await self._run_probes(node)
        except Exception as exc:
            self._node_failed(node, "probe", exc)
            return ProbeResult.FAIL, f"probe error: {type(exc).__name__}", None, None

    async def _check(self, node: Node, token: int) -> HealthReport:
        with tracing.tracer().span("fleetgate.probe", {"fleetgate.node": node.id}) as span:
            result, reason, models, load = await self._probe(node)
            span.update({"fleetgate.probe.result": result.value, "fleetgate.probe.reason": reason})
            report = await self._report(node, token, result, reason, models, load)
            span.update(
                {"fleetgate.node.state": report.state, "fleetgate.node.changed": report.changed}
            )
            if result is ProbeResult.FAIL:
                span.fail("probe_failed", reason)
            return report

    async def _run_probes(
        self, node: Node
    ) -> tuple[ProbeResult, str, list[str] | None, Load | None]:
        kinds = self.settings.probes
        result = ProbeResult.NONE
        reason = ""
        models = None
        load = None
        alive = True
        if "health" in kinds:
            finding = await self.prober.health(node)
            self._count("health", finding)
            result = ProbeResult.OK if finding.ok else ProbeResult.FAIL
            reason = finding.detail
            alive = finding.ok
        if (
            alive
            and "models" in kinds
            and self.rounds % self.settings.models_every == 1 % self.settings.models_every
        ):
            models = await self.prober.models(node)
            try:
                models = list(validate_models(models)) if models else None
            except InvalidInput as exc:  # the node's own list: its health still counts
                self._node_failed(node, "models", exc)
                models = None
        if alive and "metrics" in kinds:
            load = await self.prober.load(node)
        if alive and self._generation_due(node):
            finding = await self.prober.generate(node)
            self._count("generate", finding)
            self._last_generate[node.id] = time.monotonic()
            if finding.ok:
                self._generate_failed.discard(node.id)
                if result is ProbeResult.NONE:
                    result = ProbeResult.OK
            else:
                self._generate_failed.add(node.id)
                result, reason = ProbeResult.FAIL, finding.detail
        return result, reason, models, load

    async def _report(
        self,
        node: Node,
        token: int,
        result: ProbeResult,
        reason: str,
        models: list[str] | None,
        load: Load | None,
    ) -> HealthReport:
        report = await self.ledger.report(
            token,
            node.id,
            result,
            fall=self.settings.fall,
            rise=self.settings.rise,
            deregister_after_ms=int(self.settings.deregister_after * 1000),
            reason=reason,
            models=models,
            kv_usage=load.kv_usage if load else None,
            running=load.running if load else None,
            waiting=load.waiting if load else None,
        )
        if report.status == "removed":
            self.metrics.deregistrations.inc()
            await self.pd.drop_node(node.id)
            log.warning(
                "deregistered %s: unhealthy longer than %ss",
                node.id,
                self.settings.deregister_after,
            )
        elif report.changed:
            self.metrics.transitions.inc((("to", report.state),))
            log.warning("node %s is now %s (%s)", node.id, report.state, reason)
        return report


async def serve_metrics(checker: HealthChecker, host: str, port_: int) -> web.AppRunner:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=checker.metrics.render(), content_type="text/plain")

    async def health(request: web.Request) -> web.Response:
        body = {
            "status": "ok",
            "checker": checker.id,
            "leader": checker.leading,
            "live_replicas": checker.live_replicas,
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port_).start()
    return runner


async def run_checker(settings: CheckerSettings) -> None:
    store = Store.open(settings.redis_url, prefix=settings.prefix, timeout_s=settings.timeout)
    checker = HealthChecker(settings, store)
    tracing.setup("fleetgate-health-checker", checker.id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    if settings.metrics_port is not None:
        runner = await serve_metrics(checker, settings.metrics_host, settings.metrics_port)
    print(
        f"fleetgate: health-checker {checker.id} (interval {settings.interval:g}s, "
        f"fall {settings.fall}, rise {settings.rise})",
        flush=True,
    )
    try:
        await checker.run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        await store.close()
        tracing.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"fleetgate health-checker: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_checker(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
