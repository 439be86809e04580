"""wsss-bench: the harness (CLI, runner, budgets, cache, evaluation, sweeps, result store)."""

__version__ = "0.1.0"
