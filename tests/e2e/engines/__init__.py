"""The tests against real inference engines, built or prepared into the engines cache outside
the repository by scripts/engine (marker ``engines``): llama.cpp's ``llama-server`` and vLLM
on the CPU, behind real gateway replicas sharing a real Redis."""
