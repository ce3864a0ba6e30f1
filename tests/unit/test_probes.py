"""The health-checker's probes, in-process: reading load (KV-cache use, running and waiting
requests) from the metrics pages of vLLM, SGLang and LMDeploy."""

from __future__ import annotations

import pytest

from gateway.checker.probes import parse_load


def test_load_parsing_reads_vllm_sglang_and_lmdeploy_names() -> None:
    vllm = (
        "# HELP vllm:kv_cache_usage_perc KV-cache usage.\n"
        'vllm:kv_cache_usage_perc{model_name="a"} 0.25\n'
        'vllm:kv_cache_usage_perc{model_name="b"} 0.5\n'
        'vllm:num_requests_running{model_name="a"} 3.0\n'
        'vllm:num_requests_running{model_name="b"} 1.0\n'
        'vllm:num_requests_waiting{model_name="a"} 2.0\n'
    )
    load = parse_load(vllm)
    assert load is not None and (load.kv_usage, load.running, load.waiting) == (0.5, 4, 2)
    sglang = (
        'sglang:token_usage{model_name="x"} 0.7\n'
        "sglang:num_running_reqs 5\n"
        "sglang:num_queue_reqs 9\n"
    )
    load = parse_load(sglang)
    assert load is not None and (load.kv_usage, load.running, load.waiting) == (0.7, 5, 9)
    percent = "lmdeploy:gpu_cache_usage_perc 42\n"  # published as a percentage
    load = parse_load(percent)
    assert load is not None and load.kv_usage == pytest.approx(0.42)
    assert parse_load("process_cpu_seconds_total 3\n# nothing else\n") is None
    assert parse_load("vllm:kv_cache_usage_perc NaN\n") is None
