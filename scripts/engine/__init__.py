"""Real inference engines for the tests and benchmarks, prepared on demand and cached outside
the repository (``cache``): llama.cpp's ``llama-server`` (``llama``) with random-weight GGUF
models made here (``gguf_model``), and a vLLM CPU environment (``vllm``).

``scripts/engines.py`` is the command line over them; the end-to-end tests in
tests/e2e/engines call the same functions. Nothing that ships imports this package.
"""
