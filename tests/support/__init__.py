"""Helpers shared by the unit tests (tests/unit) and the end-to-end tests (tests/e2e).

- ``harness``: a throwaway redis-server and free loopback ports (the benchmarks' own);
- ``processes``: simulated nodes, gateway replicas and other child processes;
- ``polling``: waiting for a condition, in a test or in a coroutine;
- ``openai_errors``: what every OpenAI-shaped error answer must look like;
- ``store``: Store clients for one test, on a real Redis or on the embedded store;
- ``compose``: reading compose.yaml and the Dockerfile as the containers would run them;
- ``engines``: real llama.cpp ``llama-server`` processes, built and fed through scripts/engine,
  and vLLM's server, started in the background;
- ``health_watch``: a process that watches a server's ``/health`` while it starts.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root directory."""

MODEL = "sim-model"
"""The model a simulated node serves unless told otherwise."""
