"""Simulated OpenAI-compatible LLM nodes (``fleetgate sim-node``), Hybrid and prefill/decode:
test equipment for the tests, the benchmarks and the demo, imported by nothing else."""
