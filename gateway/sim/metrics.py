"""The simulated node's Prometheus text: vLLM's series, one per model under its ``model_name``
label (requests running and waiting, KV-cache use, the prefix cache's counters), so the checker
reads the node as it reads a vLLM engine; the vLLM flavor's series (labelled as vLLM labels
them) and the llama.cpp flavor's own names are in flavors.py, the DistServe figures in pd.py."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web


def label(model: str) -> str:
    """A model name as a Prometheus label value."""
    return model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def series(metric: str, kind: str, text: str, values: Mapping[str, float]) -> list[str]:
    """One metric's HELP, TYPE and a sample per model."""
    lines = [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
    lines += [f'{metric}{{model_name="{label(m)}"}} {float(v)}' for m, v in values.items()]
    return lines


def vllm_lines(running: Mapping[str, int], waiting: Mapping[str, int], kv: float) -> list[str]:
    """vLLM's load gauges: requests running and waiting per model, the KV cache's use (0..1)."""
    return [
        *series("vllm:num_requests_running", "gauge", "Requests in the batch.", running),
        *series("vllm:num_requests_waiting", "gauge", "Requests queued.", waiting),
        *series("vllm:kv_cache_usage_perc", "gauge", "KV-cache use.", dict.fromkeys(running, kv)),
    ]


def page(lines: list[str]) -> web.Response:
    """The ``/metrics`` answer of ``lines``."""
    return web.Response(
        body=("\n".join(lines) + "\n").encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )
