"""fleetgate's processes, one folder each: ``replica/`` (a gateway replica), ``checker/`` (the
health-checker), ``sim/`` (simulated LLM nodes) and ``ops/`` (the ops CLI), on ``common/`` (what
more than one of them uses) and the ``shared_state`` package. Only the entry points (``cli``,
``demo``, ``__main__``) import several of them; pyproject.toml's import-linter contracts say the
rest."""
