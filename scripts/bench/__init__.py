"""The benchmarks' parts, shared by the entry points scripts/bench_routing.py,
scripts/bench_gateway.py and scripts/bench_state.py: the process harness, the load generator,
the routing scenario, fleet and parts (comparison, scale, drills), the gateway's paths and
ceiling, the state's pick cost, and the targets, reports, tables, page and charts."""
